"""Classification loss: cross-entropy of the head's logits against the class ids."""

import torch.nn.functional as F


class ClassificationLoss:
    """`(preds, batch) -> (mean cross-entropy, its detached value (1,))`. `preds` are the training logits (B, nc)
    or an eval output `(probabilities, logits)`; `batch["cls"]` holds the class ids (B,)."""

    def __call__(self, preds, batch):
        logits = preds[1] if isinstance(preds, (list, tuple)) else preds
        loss = F.cross_entropy(logits.float(), batch["cls"].long().view(-1), reduction="mean")
        return loss, loss.detach().view(1)
