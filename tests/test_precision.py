"""The precision rule shared by training and inference: bf16 only where it beats fp32."""
import pytest
import torch

from chest_model import precision
from chest_model.precision import PrecisionChoice, choose_precision


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given features and bf16/fp32 matmul ratio (the real ones are read
    through these three calls)."""
    precision._bf16_is_fast.cache_clear()

    def pretend(amx: bool, bf16: bool, speedup: float | None = None) -> None:
        monkeypatch.setattr(precision, "cpu_has_amx", lambda: amx)
        monkeypatch.setattr(precision, "cpu_has_bf16_instructions", lambda: bf16)

        def probe():
            assert speedup is not None, "the matmul probe ran where the CPU's features already decide"
            return speedup
        monkeypatch.setattr(precision, "bf16_matmul_speedup", probe)

    yield pretend
    precision._bf16_is_fast.cache_clear()


@pytest.mark.parametrize("amx, bf16, speedup, expected", [
    (True, True, None, "bf16"),     # AMX: bf16 without measuring
    (False, True, 2.8, "bf16"),     # AVX512-BF16 where bf16 measures faster (an AMD EPYC)
    (False, True, 0.47, "fp32"),    # AVX512-BF16 where it measures slower (an AVX512 Xeon)
    (False, True, 1.1, "fp32"),     # within the margin: fp32
    (False, False, None, "fp32"),   # AVX2: emulated, without measuring
])
def test_auto_picks_bf16_where_the_cpu_runs_it_faster(cpu, amx, bf16, speedup, expected):
    cpu(amx, bf16, speedup)
    choice = choose_precision("cpu")
    assert choice.precision == expected and choice.reason.startswith("auto: ")
    assert choice.mixed_precision == ("bf16" if expected == "bf16" else "no")
    assert torch.backends.cpu.get_cpu_capability() in choice.reason  # the ISA is named with the reason


def test_an_explicit_request_is_kept_and_says_whether_it_is_slow(cpu):
    cpu(False, False)
    choice = choose_precision("cpu", "bf16")
    assert choice.precision == "bf16" and not choice.bf16_fast and "emulated" in choice.reason
    assert choose_precision("cpu", "no").precision == "fp32"
    with pytest.raises(ValueError, match="precision must be"):
        choose_precision("cpu", "fp64")


def test_this_machine_gets_a_reasoned_choice():
    precision._bf16_is_fast.cache_clear()
    choice = choose_precision("cpu")
    assert isinstance(choice, PrecisionChoice) and choice.precision in ("bf16", "fp32")
    measured_faster = precision.cpu_has_bf16_instructions() and precision.bf16_matmul_speedup() >= precision.BF16_PROBE_MARGIN
    assert choice.bf16_fast == (precision.cpu_has_amx() or measured_faster)


def test_the_matmul_probe_measures_a_finite_ratio():
    speedup = precision.bf16_matmul_speedup.__wrapped__(size=256, repeats=2)
    assert 0 < speedup < float("inf")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_choice_follows_tensor_cores():
    major, _ = torch.cuda.get_device_capability()
    assert choose_precision("cuda").precision == ("bf16" if major >= 8 else "fp32")


def test_memory_format_follows_what_measured_faster():
    from chest_model.precision import preferred_memory_format

    assert preferred_memory_format("cpu", "fp32") is torch.contiguous_format
    assert preferred_memory_format("cpu", "bf16") is torch.channels_last
    assert preferred_memory_format("cuda", "fp32") is torch.channels_last


def test_inference_runs_on_the_gpu_where_there_is_one_and_device_names_are_checked():
    from chest_model.precision import inference_device

    assert inference_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert inference_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        inference_device("gpu0")
    with pytest.raises(ValueError, match=f"no such CUDA GPU here \\({torch.cuda.device_count()} visible\\)"):
        inference_device(f"cuda:{torch.cuda.device_count()}")
