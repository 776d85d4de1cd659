"""The demo's pipeline end to end (quick mode), and its determinism."""

import pytest
import torch

import pycompress as pc
from pycompress.examples import digits


@pytest.mark.once_per_ci
def test_quick_pipeline_runs_end_to_end_and_is_deterministic():
    threads = torch.get_num_threads()
    results = digits.run_pipeline(seed=0, quick=True, progress=False)
    assert torch.get_num_threads() == threads
    assert list(results) == ["teacher", "student_distilled", "pruned", "ptq_w8", "qat_w8", "qat_w4", "pruned90",
                             "qat_w4_90"]
    for r in results.values():
        assert 0.5 < r.accuracy <= 1.0, (r.name, r.accuracy)  # quick mode: few epochs, well above chance (0.1)
    teacher, student = results["teacher"].model, results["student_distilled"].model
    assert digits.count_parameters(student) < digits.count_parameters(teacher) / 5
    pruned = results["pruned"]
    assert abs(pruned.info["sparsity"] - 0.8) < 0.05  # global target over the pruned layers; first conv dense
    assert pc.prune.get_mask(pruned.model.features[0]) is None
    for stage in ("ptq_w8", "qat_w8"):
        model = results[stage].model
        state = pc.quant.get_quant_state(model.classifier[1])
        assert state is not None and state.activations == "static" and state.weight_bits == 8
        mask = pc.prune.get_mask(model.classifier[1])
        assert (pc.quant.quantized_weight(model.classifier[1])[0][~mask] == 0).all()
    # pruned on to 90% from the 80% model: its zeros stay zeros, the first conv stays dense
    pruned90 = results["pruned90"]
    assert abs(pruned90.info["sparsity"] - 0.9) < 0.05
    for name, module in pruned.model.named_modules():
        mask80, mask90 = pc.prune.get_mask(module), pc.prune.get_mask(pruned90.model.get_submodule(name))
        assert (mask80 is None) == (mask90 is None), name
        if mask80 is not None:
            assert not (mask90 & ~mask80).any(), name
    # the stages worked on copies: the pruned model has no quantization attached
    assert pc.quant.get_quant_state(pruned.model.classifier[1]) is None
    again = digits.run_pipeline(seed=0, quick=True, progress=False)
    assert [r.accuracy for r in again.values()] == [r.accuracy for r in results.values()]
