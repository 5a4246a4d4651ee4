"""Reference values for kuberlhf's offline losses, from OpenRLHF 0.11.2's own loss module.

How the JSON beside this script was made (the package's loss module needs only torch and
deepspeed, so its dependencies are not installed):

    pip download --no-deps openrlhf==0.11.2 -d SCRATCH
    unzip SCRATCH/openrlhf-*.whl 'openrlhf-0.11.2.data/purelib/openrlhf/models/*' -d SCRATCH
    # empty both openrlhf/__init__.py and openrlhf/models/__init__.py (they import the trainers)
    python make_openrlhf_reference.py SCRATCH/openrlhf-0.11.2.data/purelib \
        > openrlhf_0_11_2_offline_losses.json
"""

import json
import sys

import torch

sys.path.insert(0, sys.argv[1])
from openrlhf.models.loss import DPOLoss, PairWiseLoss, SFTLoss

g = torch.Generator().manual_seed(7)
logp = (-torch.rand(3, 6, generator=g) * 4).double()
mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]], dtype=torch.float64)
chosen = torch.randn(5, generator=g).double() * 2
rejected = torch.randn(5, generator=g).double() * 2
margin = torch.rand(5, generator=g).double()
pc, pr, rc, rr = (torch.randn(5, generator=g).double() * 10 - 30 for _ in range(4))
cases = {"sft": {"logp": logp.tolist(), "mask": mask.tolist(), "loss": float(SFTLoss()(logp, mask))}}
cases["pairwise"] = {
    "chosen": chosen.tolist(),
    "rejected": rejected.tolist(),
    "margin": margin.tolist(),
    "loss": float(PairWiseLoss()(chosen, rejected)),
    "loss_with_margin": float(PairWiseLoss()(chosen, rejected, margin)),
}
dpo = {
    "policy_chosen": pc.tolist(),
    "policy_rejected": pr.tolist(),
    "ref_chosen": rc.tolist(),
    "ref_rejected": rr.tolist(),
    "results": [],
}
for beta, ls, ipo in [
    (0.1, 0.0, False),
    (0.5, 0.0, False),
    (0.1, 0.2, False),
    (0.1, 0.0, True),
    (0.3, 0.0, True),
]:
    loss, cr, rj = DPOLoss(beta, ls, ipo)(pc, pr, rc, rr)
    dpo["results"].append(
        {
            "beta": beta,
            "label_smoothing": ls,
            "ipo": ipo,
            "loss": float(loss),
            "chosen_rewards": cr.tolist(),
            "rejected_rewards": rj.tolist(),
        }
    )
cases["dpo"] = dpo
cases["source"] = (
    "openrlhf==0.11.2 (pip install --no-deps): openrlhf.models.loss SFTLoss, PairWiseLoss, DPOLoss, float64"
)
print(json.dumps(cases, indent=1))
