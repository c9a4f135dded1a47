"""Graph passes of asrfx (installed as ``asrfx.passes``).

One module per pass family: finding attention sites, the ASR rewrite, insertion, constant
evaluation, scale folding, BatchNorm fusion, branch merging, SyncBatchNorm reversion, and
clean-up. Every pass takes a GraphModule (and a :class:`~.protocol.PassContext`), edits it in
place and returns what it did, kept and refused as :class:`asrfx.report.Site` records, each
kept or refused one with a stable ``code`` (:mod:`.protocol`). Fold targets live in
:mod:`.targets`, the layer vocabulary in :mod:`.layers`.
"""

from .graph_utils import value_dependent, module_path, tensor_shape  # noqa: F401
from .find_attention import AttentionSite, find_attention_sites  # noqa: F401
from .asr_rewrite import (apply_asr, refuse_batch_statistic_sites,  # noqa: F401
                          gates_before_batch_norm)
from .const_eval import evaluate_constants  # noqa: F401
from .scale_fold import fold_scales  # noqa: F401
from .bn_fusion import fuse_batchnorm  # noqa: F401
from .cleanup import cleanup, drop_identities  # noqa: F401
from .insertion import insert_modules, insertion_points  # noqa: F401
from .branch_merge import merge_branches, merge_sequential  # noqa: F401
from .sync_bn import revert_sync_batchnorm  # noqa: F401
from .protocol import PassContext, Step, run_steps  # noqa: F401
from .targets import (FoldTarget, Refusal, register_consumer,  # noqa: F401
                      register_producer)

__all__ = ["value_dependent", "module_path", "tensor_shape", "AttentionSite",
           "find_attention_sites", "apply_asr", "refuse_batch_statistic_sites",
           "gates_before_batch_norm", "evaluate_constants", "fold_scales",
           "fuse_batchnorm", "cleanup", "drop_identities", "insert_modules", "insertion_points",
           "merge_branches", "merge_sequential", "revert_sync_batchnorm", "PassContext", "Step",
           "run_steps", "FoldTarget", "Refusal", "register_producer", "register_consumer"]
