"""What the image classifiers of every family share: the head's output as transformers returns it."""

from __future__ import annotations

from transformers.modeling_outputs import ImageClassifierOutput


def classifier_output(model, outputs, labels, return_dict: bool | None):
    """``ImageClassifierOutput`` (or its tuple with ``return_dict=False``) of ``model.head`` on the backbone's
    ``outputs.pooler_output``, with the loss when ``labels`` are given (transformers' ``loss_function``)."""
    return_dict = return_dict if return_dict is not None else model.config.return_dict
    logits = model.head(outputs.pooler_output)
    loss = model.loss_function(labels, logits, model.config) if labels is not None else None
    if not return_dict:
        rest = (outputs.hidden_states,) if outputs.hidden_states is not None else ()
        return ((loss,) if loss is not None else ()) + (logits,) + rest
    return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
