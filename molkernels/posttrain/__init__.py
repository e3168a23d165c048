"""Joint post-training of causal LMs: SFT and preference learning (DPO) together, with the
Sequential, Mix, ALRIGHT and MAXRIGHT schedules and MGDA/MoCo weighting on the fused kernels."""

from .data import ByteTokenizer, HFTokenizer, PreferenceDataset, SFTDataset, load_records
from .losses import DPOOutput, dpo_loss, response_tokens, sequence_logps, sft_loss
from .schedule import METHODS, MethodSchedule
from .trainer import JointTrainer, ReferenceLogps, model_logits, precompute_reference_logps, reference_fingerprint

__all__ = ["METHODS", "ByteTokenizer", "DPOOutput", "HFTokenizer", "JointTrainer", "MethodSchedule", "PreferenceDataset",
           "ReferenceLogps", "SFTDataset", "dpo_loss", "load_records", "model_logits", "precompute_reference_logps",
           "reference_fingerprint", "response_tokens", "sequence_logps", "sft_loss", "JointDPOTrainer"]


def __getattr__(name):
    if name == "JointDPOTrainer":  # needs TRL (pip install molkernels[trl]); the rest of the package does not
        from .trl_trainer import JointDPOTrainer

        return JointDPOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
