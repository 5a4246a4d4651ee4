"""Reference values for kuberlhf's losses (offline ones, the policy loss) from OpenRLHF 0.11.2.

How the JSON beside this script was made (the package's loss module needs only torch and
deepspeed, so its dependencies are not installed):

    pip download --no-deps openrlhf==0.11.2 -d SCRATCH
    unzip SCRATCH/openrlhf-*.whl 'openrlhf-0.11.2.data/purelib/openrlhf/models/*' -d SCRATCH
    # empty both openrlhf/__init__.py and openrlhf/models/__init__.py (they import the trainers)
    python make_openrlhf_reference.py SCRATCH/openrlhf-0.11.2.data/purelib \
        > openrlhf_0_11_2_losses.json
"""

import json
import sys

import torch

sys.path.insert(0, sys.argv[1])
from openrlhf.models.loss import DPOLoss, PairWiseLoss, PolicyLoss, SFTLoss

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
# PolicyLoss: PPO (token ratios), dual-clip, GSPO (sequence ratios), and the rollout corrections.
logp = (-torch.rand(4, 6, generator=g) * 3).double()
old_logp = logp + torch.randn(4, 6, generator=g).double() * 0.3
rollout_logp = old_logp + torch.randn(4, 6, generator=g).double() * 0.5
advantages = torch.randn(4, 1, generator=g).double() * torch.ones(4, 6).double()
action_mask = torch.tensor(
    [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]]
).double()
policy = {
    "logp": logp.tolist(),
    "old_logp": old_logp.tolist(),
    "rollout_logp": rollout_logp.tolist(),
    "advantages": advantages.tolist(),
    "mask": action_mask.tolist(),
    "results": [],
}
settings = [
    {"clip": [0.2, 0.28]},
    {"clip": [0.2, 0.2], "dual_clip": 3.0},
    {"clip": [0.2, 0.2], "token_level_loss": False},
    {"clip": [0.0003, 0.0004], "policy_loss_type": "gspo"},
    {
        "clip": [0.0003, 0.0004],
        "policy_loss_type": "gspo",
        "correction": ["seq", "mask"],
        "bounds": [0.5, 2.0],
    },
    {"clip": [0.2, 0.2], "correction": ["token", "clip"], "bounds": [0.5, 2.0]},
    {"clip": [0.2, 0.2], "correction": ["token", "mask"], "bounds": [0.5, 2.0]},
    {"clip": [0.2, 0.2], "correction": ["seq", "mask"], "bounds": [0.8, 1.25]},
]
for setting in settings:
    level, mode = setting.get("correction", ["off", "mask"])
    loss_fn = PolicyLoss(
        setting["clip"][0],
        setting["clip"][1],
        dual_clip=setting.get("dual_clip"),
        token_level_loss=setting.get("token_level_loss", True),
        policy_loss_type=setting.get("policy_loss_type", "ppo"),
        is_correction_level=level,
        is_correction_mode=mode,
        is_correction_threshold=setting.get("bounds", (0.5, 5.0)),
    )
    loss, clip_ratio, _, _, filtered = loss_fn(logp, old_logp, advantages, action_mask, rollout_logp)
    policy["results"].append(
        {
            **setting,
            "loss": float(loss),
            "clip_ratio": float(clip_ratio),
            "filtered": None if filtered is None else float(filtered),
        }
    )
cases["policy"] = policy
cases["source"] = (
    "openrlhf==0.11.2 (pip install --no-deps): openrlhf.models.loss SFTLoss, PairWiseLoss, DPOLoss, float64"
)
print(json.dumps(cases, indent=1))
