"""optimum-cli plugin: ``optimum-cli vim quantize|evaluate|convert|push ...`` runs the optimum-vim CLI.

optimum-cli imports every module of the namespace package ``optimum.commands.register`` and reads
``REGISTER_COMMANDS``; imports of optimum-vim stay inside ``run()`` so that every optimum-cli start stays cheap.
"""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

SUBCOMMANDS = (
    ("quantize", "quantize a float Vim with a recipe and save the packed checkpoint"),
    ("evaluate", "top-1 accuracy of a (quantized) Vim on a labelled image data set"),
    ("convert", "convert an official hustvl/Vim .pth checkpoint to a transformers folder"),
    ("push", "publish a (quantized) Vim folder to the Hub with its model card"),
    ("export", "export a (quantized) Vim to ONNX or a torch.export program"),
)


class VimCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="vim", help="Vision Mamba: quantize, evaluate, convert, push (optimum-vim)")

    @staticmethod
    def parse_args(parser):
        import argparse

        parser.add_argument("vim_args", nargs=argparse.REMAINDER, help="optimum-vim arguments, e.g. quantize MODEL OUT")
        # `optimum-cli vim --help` is answered by this parser; it lists the subcommands without importing optimum-vim
        # (tests check the list against optimum_vim.cli); `optimum-cli vim COMMAND --help` reaches optimum-vim's own
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.description = "Vision Mamba (optimum-vim) commands:\n" + "\n".join(
            f"  {name:<10}{text}" for name, text in SUBCOMMANDS
        ) + "\n\n`optimum-cli vim COMMAND --help` shows the options of a command."

    def run(self):
        from optimum_vim.cli import main

        code = main(list(self.args.vim_args), prog="optimum-cli vim")
        if code:
            raise SystemExit(code)


class VimExportCommand(BaseOptimumCLICommand):
    """``optimum-cli export vim MODEL OUTPUT [...]``: the optimum-cli spelling of ``optimum-vim export``."""

    COMMAND = CommandInfo(name="vim", help="export a (quantized) Vision Mamba to ONNX or torch.export (optimum-vim)")

    @staticmethod
    def parse_args(parser):
        import argparse

        parser.add_argument("vim_args", nargs=argparse.REMAINDER, help="MODEL OUTPUT [--format onnx|torch] ...")

    def run(self):
        from optimum_vim.cli import main

        code = main(["export", *self.args.vim_args], prog="optimum-cli export vim")
        if code:
            raise SystemExit(code)


def _export_parent():
    from optimum.commands.export.base import ExportCommand

    return ExportCommand


REGISTER_COMMANDS = [VimCommand, (VimExportCommand, _export_parent())]
