"""Run settings without Ray: what ``run.precision=auto`` picks, and when a time-budget plan is measured again."""
from __future__ import annotations

import pytest

from webcurate.train.plan import REFINE_STEPS, Plan, refine_at
from webcurate.train.precision import cpu_has_native_bf16, use_bf16


@pytest.mark.parametrize("precision,device,model,cpu_bf16,expected", [
    ("bf16", "cpu", "vit_tiny_patch16_224", False, True),   # explicit wins everywhere
    ("fp32", "cuda", "resnet18", True, False),
    ("auto", "cuda", "vit_small_patch14_dinov2", False, True),
    ("auto", "cpu", "resnet18", True, True),                # ConvNet + native bf16: measured ~2x
    ("auto", "cpu", "resnet18", False, False),              # no native bf16: emulated, slower
    ("auto", "cpu", "vit_tiny_patch16_224", True, False),   # ViT on CPU: not measured, fp32
])
def test_use_bf16(precision: str, device: str, model: str, cpu_bf16: bool, expected: bool) -> None:
    assert use_bf16(precision, device, model, cpu_bf16=cpu_bf16) is expected


@pytest.mark.parametrize("flags,expected", [
    ("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni", True),
    ("fpu sse2 avx2 amx_tile amx_bf16", True),
    ("fpu sse2 avx2 avx512f avx512bw", False),
])
def test_cpu_flags(tmp_path, flags: str, expected: bool) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16(str(info)) is expected


def test_cpu_flags_unreadable(tmp_path) -> None:
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is False


def test_a_budget_plan_is_measured_again_after_the_warm_up_steps_unless_the_run_is_short() -> None:
    long_run = Plan(827, 195, 256, "run.time_budget", 0.995)
    assert refine_at(long_run, 6) == 6 + REFINE_STEPS
    short_run = Plan(2 * (6 + REFINE_STEPS) - 1, 195, 256, "run.time_budget", 0.995)
    assert refine_at(short_run, 6) is None
