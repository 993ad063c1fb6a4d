/* Primal active-set solver for batches of non-negative quadratic programs (jdoptim).
 *
 * For every row r: minimise 1/2 s^T G s + c_r^T s subject to s >= 0, with G symmetric positive
 * definite (m x m, row-major, shared by all rows). See jdoptim/solvers/native.py for the math,
 * the guarantees and how the result is checked. Plain C99, no dependencies.
 */
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <string.h>

/* a . b over n entries, in eight interleaved partial sums: independent chains that the CPU
 * overlaps (and the compiler may pack into vectors), in a fixed order (deterministic). */
static double dot(const double *restrict a, const double *restrict b, int n)
{
    double p[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    int k = 0;
    for (; k + 8 <= n; k += 8)
        for (int j = 0; j < 8; j++)
            p[j] += a[k + j] * b[k + j];
    for (; k < n; k++)
        p[k & 7] += a[k] * b[k];
    return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

/* ||u||_2, computed on u scaled by 2^-e, 2^e <= max|u_i| < 2^(e+1) (exact), so that no square
 * overflows or underflows; eight partial maxima and sums (independent chains, fixed order). */
static double norm(const double *u, int m)
{
    double t[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    double p[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    int k = 0;
    for (; k + 8 <= m; k += 8)
        for (int j = 0; j < 8; j++)
            t[j] = fabs(u[k + j]) > t[j] ? fabs(u[k + j]) : t[j];  /* NaN entries skipped */
    for (; k < m; k++)
        t[0] = fabs(u[k]) > t[0] ? fabs(u[k]) : t[0];
    double top = 0.0;
    for (int j = 0; j < 8; j++)
        top = t[j] > top ? t[j] : top;
    if (!(top > 0.0) || isinf(top))
        return top;
    /* 2^-e in two factors: a single one overflows for a subnormal top (e < -1023). */
    const int e = ilogb(top), half = -e / 2;
    const double down1 = ldexp(1.0, half), down2 = ldexp(1.0, -e - half);
    for (k = 0; k + 8 <= m; k += 8)
        for (int j = 0; j < 8; j++) {
            const double v = (u[k + j] * down1) * down2;
            p[j] += v * v;
        }
    for (; k < m; k++) {
        const double v = (u[k] * down1) * down2;
        p[0] += v * v;
    }
    const double sum = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
    return ldexp(sqrt(sum), e);
}

/* y[0..n) += alpha x[0..n). */
static void axpy(int n, double alpha, const double *restrict x, double *restrict y)
{
    for (int k = 0; k < n; k++)
        y[k] += alpha * x[k];
}


/* Every factor below is a lower-triangular L (row-major, leading dimension m) with r, the
 * reciprocals of its diagonal: products replace divisions on the solves' critical paths. */

/* Extend the factor of G restricted to idx[0..n0) to idx[0..n): rows n0..n-1 (n0 = 0: from
 * scratch). By columns: the entries of one column are independent dot products, which the CPU
 * overlaps (rows one at a time would chain them). Returns 0, or -1 if a pivot is not positive. */
static int extend(int m, const double *G, const int *idx, int n0, int n, double *L, double *r)
{
    for (int j = 0; j < n; j++) {
        const double *gj = G + (size_t)idx[j] * m;
        double *lj = L + (size_t)j * m;
        if (j >= n0) {
            const double v = gj[idx[j]] - dot(lj, lj, j);
            if (!(v > 0.0))
                return -1;
            lj[j] = sqrt(v);
            r[j] = 1.0 / lj[j];
        }
        for (int i = j + 1 > n0 ? j + 1 : n0; i < n; i++) {
            double *li = L + (size_t)i * m;
            li[j] = (gj[idx[i]] - dot(li, lj, j)) * r[j];
        }
    }
    return 0;
}

/* Remove position p from the factor L of the n indices idx[0..n) (and from idx): with
 * L = [L11 0 0; l' d 0; L31 x L33], the factor of the rest is [L11 0; L31 L33~], where
 * L33~ L33~^T = L33 L33^T + x x^T, a rank-one update (O((n - p) n)). xs: scratch, n doubles. */
static void drop(int m, double *L, double *r, int *idx, int n, int p, double *xs)
{
    for (int i = p + 1; i < n; i++) {
        double *src = L + (size_t)i * m, *dst = L + (size_t)(i - 1) * m;
        xs[i - p - 1] = src[p];
        memmove(dst, src, sizeof(double) * (size_t)p);
        memmove(dst + p, src + p + 1, sizeof(double) * (size_t)(i - p));
        idx[i - 1] = idx[i];
    }
    const int k = n - p - 1;
    for (int i = 0; i < k; i++) {
        double *li = L + (size_t)(p + i) * m;
        const double lii = li[p + i], xi = xs[i];
        const double d = sqrt(lii * lii + xi * xi);
        const double cc = d / lii, sn = xi / lii, ci = lii / d;
        li[p + i] = d;
        r[p + i] = 1.0 / d;
        for (int j = i + 1; j < k; j++) {
            double *lj = L + (size_t)(p + j) * m;
            const double v = (lj[p + i] + sn * xs[j]) * ci;
            xs[j] = cc * xs[j] - sn * v;
            lj[p + i] = v;
        }
    }
}

/* Work of drop() at position p of n (shifting and updating the rows below p). */
static long drop_work(int n, int p)
{
    return 2L * (n - p) * n;
}

/* Refactoring the `rest` indices that stay (about rest^3 / 6) costs less than the drops. */
static int refactor_cheaper(long drop_cost, long rest)
{
    return 6 * drop_cost > rest * rest * rest;
}

/* A free index leaves at a blocking step: the blocking one, and ties at their bound. */
static int leaves(int i, int block, double zi, double si)
{
    return i == block || (zi < 0.0 && si <= 0.0);
}

/* x <- (L L^T)^{-1} x, for the n x n factor L (leading dimension m). */
static void chol_solve(int m, const double *L, const double *r, int n, double *x)
{
    for (int i = 0; i < n; i++) {
        const double *li = L + (size_t)i * m;
        x[i] = (x[i] - dot(li, x, i)) * r[i];
    }
    /* L^T x = y by columns of L^T, i.e. rows of L (contiguous). */
    for (int i = n - 1; i >= 0; i--) {
        const double *li = L + (size_t)i * m;
        x[i] *= r[i];
        axpy(i, -x[i], li, x);
    }
}

/* z = -(G_FF)^{-1} c_F on the n free indices (L: a factor of G_FF). */
static void face_solve(int m, const double *L, const double *r, const int *free, int n,
                       const double *c, double *z)
{
    for (int i = 0; i < n; i++)
        z[i] = -c[free[i]];
    chol_solve(m, L, r, n, z);
}

/* w = sum_i coef[i] M[idx[i], :] over n rows of the m x m matrix M (contiguous rows; four per
 * pass over w). */
static void combine_rows(int m, const double *M, const int *idx, const double *coef, int n,
                         double *w)
{
    memset(w, 0, sizeof(double) * (size_t)m);
    int a = 0;
    for (; a + 4 <= n; a += 4) {
        const double *restrict h0 = M + (size_t)idx[a] * m;
        const double *restrict h1 = M + (size_t)idx[a + 1] * m;
        const double *restrict h2 = M + (size_t)idx[a + 2] * m;
        const double *restrict h3 = M + (size_t)idx[a + 3] * m;
        const double l0 = coef[a], l1 = coef[a + 1], l2 = coef[a + 2], l3 = coef[a + 3];
        for (int j = 0; j < m; j++)
            w[j] += (l0 * h0[j] + l1 * h1[j]) + (l2 * h2[j] + l3 * h3[j]);
    }
    for (; a < n; a++)
        axpy(m, coef[a], M + (size_t)idx[a] * m, w);
}

/* z[k] = s-target of free index free[k] on the face, from the active side (H = G^{-1}): as
 * G v = lam with lam_F = 0 and v_A = u_A, the multipliers are lam_A = (H_AA)^{-1} u_A (L: a
 * factor of H_AA) and v_F = H_{F,A} lam_A, so s_F = H_{F,A} lam_A - u_F.
 * lamA (out): the multipliers, in the order of act. */
static void face_solve_active(int m, const double *H, const double *L, const double *r,
                              const int *act, int na,
                              const int *free, int n, const double *u, double *lamA, double *z,
                              double *w)
{
    for (int i = 0; i < na; i++)
        lamA[i] = u[act[i]];
    chol_solve(m, L, r, na, lamA);
    combine_rows(m, H, act, lamA, na, w);  /* v = H_{:,A} lam_A (H is symmetric) */
    for (int k = 0; k < n; k++)
        z[k] = w[free[k]] - u[free[k]];
}

/* One row. s (out, m); lam, z, w (work, m each); L (work, m*m) and rd (work, m): a factor
 * and the reciprocals of its diagonal; free/act (work, m each). start (may be NULL): indices
 * with start[i] != 0 are freed before the first step. H (may be NULL): G^{-1}; with it, a row
 * whose start has fewer active than free indices solves its faces from the active side (a
 * factor of H_AA instead of G_FF).
 * Returns the number of steps taken (>= 0), or -1 (no convergence within max_steps, or a
 * factorisation failed: the caller solves this row another way). */
static int solve_row(int m, const double *G, const double *H, const double *u, const double *c,
                     const unsigned char *start, double tol, int max_steps, double *s,
                     double *lam, double *L, double *rd, int *free, int *act, double *z,
                     double *w)
{
    int n = 0, na = 0, steps = 0;
    memset(s, 0, sizeof(double) * (size_t)m);
    for (int i = 0; i < m; i++) {
        if (start != NULL && start[i])
            free[n++] = i;
        else
            act[na++] = i;
    }
    const int active_side = H != NULL && na < n;
    if (active_side ? extend(m, H, act, 0, na, L, rd) : extend(m, G, free, 0, n, L, rd))
        return -1;
    for (;;) {
        /* Minimise on the face {s_i = 0 outside free}; step towards the face's minimiser,
         * stopping at the first bound it crosses, which leaves the free set. */
        for (;;) {
            if (++steps > max_steps)
                return -1;
            if (active_side)
                face_solve_active(m, H, L, rd, act, na, free, n, u, lam, z, w);
            else
                face_solve(m, L, rd, free, n, c, z);
            double alpha = 1.0;
            int block = -1;
            for (int i = 0; i < n; i++) {
                double si = s[free[i]];
                if (z[i] < 0.0) {
                    double a = si / (si - z[i]);
                    if (a < alpha) {
                        alpha = a;
                        block = i;
                    }
                }
            }
            for (int i = 0; i < n; i++) {
                double si = s[free[i]];
                s[free[i]] = si + alpha * (z[i] - si);
            }
            if (block < 0)
                break;
            /* Every free index at its bound leaves (the blocking one, and ties). From the
             * free side, each leaves the factor of G_FF by a rank-one update, last position
             * first (earlier positions stay put), unless refactoring is cheaper. */
            int leaving = 0;
            long drop_cost = 0;
            for (int i = n - 1; i >= 0; i--) {
                if (leaves(i, block, z[i], s[free[i]]))
                    drop_cost += drop_work(n - leaving++, i);
            }
            const int refactor = !active_side && refactor_cheaper(drop_cost, n - leaving);
            if (active_side || refactor) {
                const int na0 = na;
                int kept = 0;
                for (int i = 0; i < n; i++) {
                    int fi = free[i];
                    if (leaves(i, block, z[i], s[fi])) {
                        s[fi] = 0.0;
                        act[na++] = fi;
                    } else {
                        free[kept++] = fi;
                    }
                }
                n = kept;
                if (active_side ? extend(m, H, act, na0, na, L, rd)
                                : extend(m, G, free, 0, n, L, rd))
                    return -1;
            } else {
                for (int i = n - 1; i >= 0; i--) {
                    int fi = free[i];
                    if (leaves(i, block, z[i], s[fi])) {
                        s[fi] = 0.0;
                        act[na++] = fi;
                        drop(m, L, rd, free, n--, i, w);
                    }
                }
            }
        }
        /* Multipliers of the active bounds: lam = G s + c (free entries are 0). After a full
         * step from the active side they are the face's multipliers, already at hand. */
        if (!active_side) {
            for (int k = 0; k < n; k++)
                z[k] = s[free[k]];
            combine_rows(m, G, free, z, n, w);  /* G s, by rows of G (symmetric) */
            for (int a = 0; a < na; a++)
                lam[a] = c[act[a]] + w[act[a]];
        }
        /* Every bound of negative multiplier (below -tol) is freed at once: the face
         * minimiser then has a lower objective, and the step towards it is a descent step.
         * The free side's factor grows by their rows; from the active side they leave the
         * factor of H_AA by rank-one updates (as above), unless refactoring is cheaper. */
        int leaving = 0;
        long drop_cost = 0;
        for (int a = na - 1; a >= 0; a--) {
            if (lam[a] < -tol)
                drop_cost += drop_work(na - leaving++, a);
        }
        if (leaving == 0)
            return steps;
        if (!active_side || refactor_cheaper(drop_cost, na - leaving)) {
            const int n0 = n;
            int kept = 0;
            for (int a = 0; a < na; a++) {
                if (lam[a] < -tol)
                    free[n++] = act[a];
                else
                    act[kept++] = act[a];
            }
            na = kept;
            if (active_side ? extend(m, H, act, 0, na, L, rd)
                            : extend(m, G, free, n0, n, L, rd))
                return -1;
        } else {
            for (int a = na - 1; a >= 0; a--) {
                if (lam[a] < -tol) {
                    free[n++] = act[a];
                    drop(m, L, rd, act, na--, a, w);
                }
            }
        }
    }
}

/* k rows: U, C = U G and X are k x m (row-major); start is k x m or NULL; steps (out) has k
 * entries; H is G^{-1} or NULL. A row's multipliers are taken as negative below -tol ||u||_2.
 * On return, X = U + S (the solutions). work: 4m + m*m doubles; iwork: 2m ints. */
void jdoptim_nnqp(int k, int m, const double *G, const double *H, const double *U,
                  const double *C, const unsigned char *start, double tol, int max_steps,
                  double *X, int *steps, double *work, int *iwork)
{
    double *lam = work, *z = work + m, *w = work + 2 * (size_t)m, *rd = work + 3 * (size_t)m;
    double *L = work + 4 * (size_t)m;
    for (int r = 0; r < k; r++) {
        const size_t o = (size_t)r * m;
        const double *u = U + o;
        double *x = X + o;
        steps[r] = solve_row(m, G, H, u, C + o, start ? start + o : NULL,
                             tol * norm(u, m), max_steps, x, lam, L, rd, iwork,
                             iwork + m, z, w);
        for (int i = 0; i < m; i++)
            x[i] += u[i];
    }
}

/* The certificate of jdoptim.solvers.active_set.certify for k rows x of X (k x m) with bounds
 * U, given R = X G (computed by the caller): entries within sigma = 1e-3 rtol ||u|| / sqrt(m)
 * of their bound are snapped onto it (x -> x_s, G x_s = R - G (x - x_s)); e = G x_s, clamped
 * to min(., 0) at the bounds; ok[r] = 1 when ||x - x_s|| + ||e|| / mu <= rtol ||u||, else 0
 * (and 0 for a row with a non-finite entry). work: 2m doubles. */
void jdoptim_certify(int k, int m, const double *G, const double *U, const double *X,
                     const double *R, double mu, double rtol, unsigned char *ok, double *work)
{
    double *gap = work, *e = work + m;
    const double spread = 1e-3 / sqrt(m > 1 ? (double)m : 1.0);
    for (int r = 0; r < k; r++) {
        const size_t o = (size_t)r * m;
        const double *u = U + o, *x = X + o;
        const double target = rtol * norm(u, m), sigma = target * spread;
        /* Branch-free loops (their tests depend on the data). */
        int bad = 0, snapped = 0;
        memcpy(e, R + o, sizeof(double) * (size_t)m);
        for (int j = 0; j < m; j++) {
            const double g = x[j] - u[j];
            bad |= !(fabs(g) <= DBL_MAX) | !(fabs(e[j]) <= DBL_MAX);  /* inf or NaN */
            gap[j] = g <= sigma ? g : 0.0;
            snapped |= gap[j] != 0.0;
        }
        if (bad) {
            ok[r] = 0;
            continue;
        }
        for (int j = 0; snapped && j < m; j++) {
            if (gap[j] != 0.0)  /* snapped onto its bound: G x_s = G x - G (x - x_s) */
                axpy(m, -gap[j], G + (size_t)j * m, e);
        }
        for (int j = 0; j < m; j++) {
            const double clamped = e[j] > 0.0 ? 0.0 : e[j];
            e[j] = x[j] - u[j] <= sigma ? clamped : e[j];
        }
        ok[r] = (snapped ? norm(gap, m) : 0.0) + norm(e, m) / mu <= target;
    }
}
