"""Derive the piecewise-polynomial GELU table used by every kernel epilogue.

The kernels (csrc/common/epilogue_math.h and its AVX2/AVX-512 mirrors) compute
GELU(x) = x * Phi(x) from E(u) = Phi(-u) = erfc(u / sqrt 2) / 2, u = |x|:

    s  = min(u * S, K - 1)          S = 9/8, K = 8 (one 8-lane permute per coefficient)
    n  = round-to-nearest-even(s)   interval index 0..K-1
    t  = s - n                      exact (Sterbenz), t in [-1/2, 1/2]
    E  = c_D[n] + t * (... + t * c_0[n])   Horner, degree D = 7, no FMA
    Phi(x) = 1 - E for x >= 0, E for x < 0

Interval n in 0..K-2 covers u in [(n - 1/2)/S, (n + 1/2)/S] (n = 0 only its
u >= 0 half); interval K-1 (u >= (K - 3/2)/S = 5.78) has all coefficients 0,
so GELU saturates to exactly x (x > 0) and -0 (x < 0); E(5.78) = 3.8e-9.

Each interval's coefficients are a float64 weighted least-squares fit of E on
400 Chebyshev nodes of t, weighted by 1/E (relative error, so that negative x,
where GELU(x) = x * E(|x|) is tiny, keeps relative accuracy), then rounded to
float32. Run this script to print the table (C++ and Python) and its errors;
the tables in epilogue_math.h and pycompress/reference/q8.py are its output.
"""
import numpy as np
from scipy.special import erfc, ndtr

S, K, DEGREE, NODES = 1.125, 8, 7, 400


def half_erfc(u):
    return 0.5 * erfc(u / np.sqrt(2.0))


def derive_table():
    """table[j][n]: coefficient of t**j on interval n, float32."""
    table = np.zeros((DEGREE + 1, K))
    cheb = np.cos(np.pi * (np.arange(NODES) + 0.5) / NODES)
    for n in range(K - 1):
        lo, hi = (0.0, 0.5) if n == 0 else (-0.5, 0.5)
        t = lo + (hi - lo) * (cheb + 1) / 2
        target = half_erfc((n + t) / S)
        vander = np.vander(t, DEGREE + 1, increasing=True) / target[:, None]
        table[:, n] = np.linalg.lstsq(vander, np.ones_like(t), rcond=None)[0]
    return table.astype(np.float32)


def gelu_f32(x, table):
    """The spec, op for op in float32 (numpy rounds every op to float32)."""
    f = np.float32
    s = np.abs(x) * f(S)
    s = np.where(s < f(K - 1), s, f(K - 1)).astype(f)
    n = np.rint(s).astype(f)
    t = s - n
    idx = n.astype(np.int32)
    e = table[DEGREE][idx]
    for j in range(DEGREE - 1, -1, -1):
        e = e * t + table[j][idx]
    phi = np.where(x >= 0, f(1) - e, e)
    return x * phi, phi


def main():
    table = derive_table()
    print("// C++ (gelu_c::kTable, [coefficient][interval], 16 lanes for the AVX-512 permute)")
    for row in table:
        print("    {" + ", ".join(f"{v:.9g}f" if v else "0.0f" for v in row) + ", 0, 0, 0, 0, 0, 0, 0, 0},")
    print("# Python (reference/q8.py _GELU_TABLE)")
    for row in table:
        print("    (" + ", ".join(f"{v:.9g}" if v else "0.0" for v in row) + "),")

    x = np.linspace(-12, 12, 4_000_001, dtype=np.float32)
    xd = x.astype(np.float64)
    y, phi = gelu_f32(x, table)
    # Fit error alone: the float32 table evaluated in float64.
    s = np.minimum(np.abs(xd) * S, K - 1)
    n = np.rint(s)
    t = s - n
    e64 = np.polynomial.polynomial.polyval(t, table.astype(np.float64)[:, n.astype(int)], tensor=False)
    true_e = half_erfc(np.abs(xd))
    fit = np.abs(e64 - true_e)
    print(f"max |E fit error| (float64 eval of the float32 table): {fit.max():.3e}")
    print(f"max relative E fit error for |x| <= 5.5: {np.max((fit / true_e)[np.abs(xd) <= 5.5]):.3e}")
    # Rounding of the float32 Horner loop: Higham's running error bound (each op adds at most
    # u = eps/2 of its rounded result), evaluated at every grid point.
    u = np.float64(np.finfo(np.float32).eps) / 2
    idx = n.astype(np.int32)
    t32 = t.astype(np.float32)
    e = table[DEGREE][idx]
    running = np.zeros_like(xd)
    for j in range(DEGREE - 1, -1, -1):
        prod = e * t32
        e = prod + table[j][idx]
        running = running * np.abs(t) + u * (np.abs(prod) + np.abs(e))
    print(f"max Horner rounding bound: {running.max():.3e} = {running.max() / (2 * u):.3f} eps")
    tail = np.abs(xd) <= 5.5
    print(f"max relative Horner rounding bound for |x| <= 5.5: {np.max(running[tail] / true_e[tail]):.3e}")
    phi_true = ndtr(xd)
    print(f"max |Phi error| in float32: {np.max(np.abs(phi - phi_true)):.3e}")
    neg = (xd < 0) & (xd > -5.5)
    print(f"max relative GELU error for -5.5 < x < 0: {np.max(np.abs(phi[neg] - phi_true[neg]) / phi_true[neg]):.3e}")
    gelu = xd * phi_true
    eps = float(np.finfo(np.float32).eps)
    ratio = (np.abs(y - gelu) - eps / 2 * np.abs(gelu)) / np.maximum(np.abs(xd), 1e-30)
    print(f"max (|GELU error| - eps/2 |GELU|) / |x|: {ratio.max():.3e}  (eps = {eps:.3e})")


if __name__ == "__main__":
    main()
