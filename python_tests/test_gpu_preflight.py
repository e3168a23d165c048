"""benchmarks/gpu_preflight.py without its minutes of compiling: the configurations it derives from
the launchers keep tiles register-sized, a 100-parameter model's first steps request few Triton
variants in four launches, and the largest float64 MoCo tile compiles for sm_90 without spilling.

The preflight runs in a subprocess: it needs the compiled @triton.jit kernels, while this test
process has them interpreted (TRITON_INTERPRET=1 is read when they are defined).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from molkernels import _ops

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
sys.path.insert(0, "benchmarks")
import gpu_preflight as preflight
configs = preflight.configurations(64)
largest = max((c for c in configs if c["kernel"] == "_track_gram_kernel"),
              key=lambda c: (c["constexprs"]["ACC_DTYPE"] == "fp64", c["constexprs"]["BLOCK_K"]))
print(json.dumps({"configs": configs, "variants": preflight.variant_counts(K_values=(4,)),
                  "compiled": preflight.compile_configuration(largest, use_cache=False)}))
"""


@pytest.fixture(scope="module")
def preflight():
    reason = _ops.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(f"backend 'triton' is unavailable: {reason}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.triton
def test_broadcast_product_tiles_stay_small(preflight):
    """The non-dot products hold a [BLOCK_K, BLOCK_K, BLOCK_D] temporary: gram's BLOCK_K limits
    (8 rows in fp32, 16 in fp64) hold for every kernel and K up to 64."""
    for config in preflight["configs"]:
        constexprs = config["constexprs"]
        if constexprs.get("USE_DOT") is False:
            limit = 16 if constexprs["ACC_DTYPE"] == "fp64" else 8
            assert constexprs["BLOCK_K"] <= limit, config


@pytest.mark.triton
def test_joint_gram_dot_tiles_get_8_warps_and_split_above_32_rows(preflight):
    """Three 64 x 64 accumulators spilled on sm_90: above 32 rows no launch holds all three."""
    joint = [c for c in preflight["configs"] if c["kernel"] == "_joint_gram_kernel"]
    assert joint and all(c["options"]["num_warps"] == 8 for c in joint if c["constexprs"]["USE_DOT"])
    wide = [c["constexprs"] for c in joint if c["constexprs"]["BLOCK_K"] > 32]
    assert wide and not any(c["Y_PRODUCTS"] and c["G_PRODUCT"] for c in wide)
    assert {(c["Y_PRODUCTS"], c["G_PRODUCT"]) for c in wide} == {(True, False), (False, True)}


@pytest.mark.triton
def test_first_steps_of_an_odd_model_compile_few_variants(preflight):
    for step, K, dtype, variants, launches in preflight["variants"]:
        assert variants <= 8, f"{step} K={K} {dtype}: {variants} variants for {launches} launches"


@pytest.mark.triton
def test_first_steps_of_an_odd_model_make_four_launches(preflight):
    """With a GPU's tiles, a first mgda_step or moco_step of 100 parameters is four Triton launches
    (the Gram or MoCo's first pass over a table of every block, its reduction, the weights, the
    combination), not one per block."""
    for step, K, dtype, variants, launches in preflight["variants"]:
        assert launches == 4, f"{step} K={K} {dtype}: {launches} launches"


@pytest.mark.triton
def test_largest_float64_moco_tile_compiles_for_sm90_without_spills(preflight):
    compiled = preflight["compiled"]
    assert compiled["spill_bytes"] == 0, compiled
    assert compiled["seconds"] < 20, compiled
