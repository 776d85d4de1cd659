"""QAT beats PTQ at 4-bit weights on the digits CNN (real data)."""

import pytest
import torch
import torch.nn.functional as F

from pycompress.examples import digits


@pytest.mark.once_per_ci
def test_qat_beats_ptq_at_4_bit_weights():
    # The claim is on the test loss (NLL over 360 images). Accuracy is not compared: it moves by single
    # images between CPUs (the float student trains to slightly different weights on each), e.g. seed 2 on
    # an Intel Xeon with AMX: round-to-nearest PTQ 0.9861, QAT 0.9833, one image apart, while QAT's NLL
    # is 14% lower. Measured test NLL, seeds 0 / 2 (float, RTN PTQ, GPTQ PTQ, QAT), Intel Xeon (2026-12-03):
    # 0.061 / 0.069 / 0.065 / 0.060 and 0.051 / 0.059 / 0.057 / 0.051.
    for seed in (0, 2):
        data = digits.load_data(seed)
        student = digits.train_student_from_scratch(data, seed, epochs=10, progress=False)
        qat = digits.quantize_qat(student.model, data, weight_bits=4, seed=seed, epochs=2, progress=False)

        def nll(model):
            with torch.no_grad():
                return float(F.cross_entropy(model.eval()(data.x_test), data.y_test))

        ptq_nll = {}
        for method in ("rtn", "gptq"):
            ptq = digits.quantize_ptq(student.model, data, weight_bits=4, progress=False, method=method)
            assert ptq.accuracy < student.accuracy + 0.01  # PTQ at 4 bits does not improve the model
            ptq_nll[method] = nll(ptq.model)
            assert ptq_nll[method] > nll(student.model), (seed, method)  # ... and costs loss
        assert ptq_nll["gptq"] < ptq_nll["rtn"], (seed, ptq_nll)  # GPTQ recovers part of it
        assert nll(qat.model) < 0.95 * min(ptq_nll.values()), (seed, nll(qat.model), ptq_nll)  # QAT more
