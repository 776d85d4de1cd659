"""Derive the polynomial of the attention kernels' 2^x (csrc/attention/attention_exp.h).

    2^x = 2^n * 2^f,  n = round(x),  f = x - n in [-1/2, 1/2] (exact)
    2^f ~ 1 + f * (c1 + f * (c2 + f * (c3 + f * (c4 + f * (c5 + f * c6)))))

The coefficients minimise the maximum relative error of 2^f on [-1/2, 1/2]: a
float64 least-squares fit on 3000 Chebyshev nodes, reweighted by Lawson's
iteration towards the minimax solution, then rounded to float32. Run this script
to print them and their fit error; attention_exp.h holds its output. The error
of the whole float32 evaluation (Horner with FMA, then vscalefps or the AVX2
exponent multiplies) is measured by tests/test_attention.py::test_exp2_accuracy.
"""
import numpy as np

DEGREE, NODES, LAWSON_STEPS = 6, 3000, 300


def derive() -> np.ndarray:
    """float32 [c1, ..., c6]."""
    f = 0.5 * np.cos(np.pi * (np.arange(NODES) + 0.5) / NODES)
    target = np.exp2(f) - 1.0
    basis = np.vander(f, DEGREE, increasing=True) * f[:, None]  # f, f^2, ..., f^6
    relative = 1.0 / np.exp2(f)
    weights = np.full(NODES, 1.0 / NODES)
    for _ in range(LAWSON_STEPS):
        w = relative * np.sqrt(weights)
        coef = np.linalg.lstsq(basis * w[:, None], target * w, rcond=None)[0]
        err = np.abs((basis @ coef - target) * relative)
        weights *= err / err.max() + 1e-30
        weights /= weights.sum()
    return coef.astype(np.float32)


def max_relative_error(coef: np.ndarray) -> float:
    f = np.linspace(-0.5, 0.5, 200_001)
    approx = 1.0 + f * np.polyval(coef[::-1].astype(np.float64), f)
    return float(np.max(np.abs(approx / np.exp2(f) - 1.0)))


if __name__ == "__main__":
    coef = derive()
    for i, c in enumerate(coef, start=1):
        print(f"constexpr float kC{i} = {float(c)!r}f;")
    print(f"// relative fit error {max_relative_error(coef):.2g}")
