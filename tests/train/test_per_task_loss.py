"""The per-task loss the trainer logs equals a token-by-token loop."""

import torch

from asymlora.train.trainer import per_task_token_losses


def test_per_task_token_losses_match_a_loop():
    torch.manual_seed(0)
    logits = torch.randn(4, 9, 13)
    labels = torch.randint(0, 13, (4, 9))
    labels[0, :4] = -100
    labels[3, :] = -100  # a sample with nothing to learn
    task_ids = torch.tensor([0, 2, 0, 1])
    sums, tokens = per_task_token_losses(logits, labels, task_ids, 3)
    ref_sums, ref_tokens = torch.zeros(3, dtype=torch.float64), torch.zeros(3)
    for b, task in enumerate(task_ids.tolist()):
        for t in range(8):
            if labels[b, t + 1] != -100:
                ref_sums[task] += torch.nn.functional.cross_entropy(logits[b, t][None].double(), labels[b, t + 1][None])
                ref_tokens[task] += 1
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, ref_tokens)
