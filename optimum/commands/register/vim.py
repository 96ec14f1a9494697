"""optimum-cli plugin: ``optimum-cli vim quantize|evaluate|convert|push ...`` runs the optimum-vim CLI.

optimum-cli imports every module of the namespace package ``optimum.commands.register`` and reads
``REGISTER_COMMANDS``; imports of optimum-vim stay inside ``run()`` so that every optimum-cli start stays cheap.
"""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class VimCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="vim", help="Vision Mamba: quantize, evaluate, convert, push (optimum-vim)")

    @staticmethod
    def parse_args(parser):
        import argparse

        parser.add_argument("vim_args", nargs=argparse.REMAINDER, help="optimum-vim arguments, e.g. quantize MODEL OUT")

    def run(self):
        from optimum_vim.cli import main

        code = main(list(self.args.vim_args))
        if code:
            raise SystemExit(code)


REGISTER_COMMANDS = [VimCommand]
