"""The precision rule shared by training and inference: bf16 only where it beats fp32."""
import pytest
import torch

from chest_model import precision
from chest_model.precision import PrecisionChoice, choose_precision


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given features (the real ones are read through these two calls)."""
    precision._bf16_is_fast.cache_clear()
    yield lambda amx, bf16: (monkeypatch.setattr(precision, "cpu_has_amx", lambda: amx),
                             monkeypatch.setattr(precision, "cpu_has_bf16_instructions", lambda: bf16))
    precision._bf16_is_fast.cache_clear()


@pytest.mark.parametrize("amx, bf16, expected", [(True, True, "bf16"), (False, True, "fp32"), (False, False, "fp32")])
def test_auto_picks_bf16_only_on_cpus_with_amx(cpu, amx, bf16, expected):
    cpu(amx, bf16)
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
    assert choice.bf16_fast == precision.cpu_has_amx()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_choice_follows_tensor_cores():
    major, _ = torch.cuda.get_device_capability()
    assert choose_precision("cuda").precision == ("bf16" if major >= 8 else "fp32")


def test_memory_format_follows_what_measured_faster():
    from chest_model.precision import preferred_memory_format

    assert preferred_memory_format("cpu", "fp32") is torch.contiguous_format
    assert preferred_memory_format("cpu", "bf16") is torch.channels_last
    assert preferred_memory_format("cuda", "fp32") is torch.channels_last
