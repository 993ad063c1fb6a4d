/* Primal active-set solver for batches of non-negative quadratic programs (jdoptim).
 *
 * For every row r: minimise 1/2 s^T G s + c_r^T s subject to s >= 0, with G symmetric positive
 * definite (m x m, row-major, shared by all rows). See jdoptim/solvers/native.py for the math,
 * the guarantees and how the result is checked. Plain C99, no dependencies.
 */
#include <math.h>
#include <stddef.h>
#include <string.h>

#ifndef BLOCK
#define BLOCK 1
#endif

/* Cholesky factor L (lower, row-major with leading dimension m) of G restricted to the indices
 * free[0..n), from scratch. Returns 0 on success, -1 if a pivot is not positive. */
static int factor(int m, const double *G, const int *free, int n, double *L)
{
    for (int i = 0; i < n; i++) {
        const double *gi = G + (size_t)free[i] * m;
        double *li = L + (size_t)i * m;
        for (int j = 0; j <= i; j++) {
            const double *lj = L + (size_t)j * m;
            double v = gi[free[j]];
            for (int k = 0; k < j; k++)
                v -= li[k] * lj[k];
            if (j < i) {
                li[j] = v / lj[j];
            } else {
                if (!(v > 0.0))
                    return -1;
                li[i] = sqrt(v);
            }
        }
    }
    return 0;
}

/* Append index j to the factor of the n free indices (one new row). */
static int append(int m, const double *G, const int *free, int n, int j, double *L)
{
    const double *gj = G + (size_t)j * m;
    double *ln = L + (size_t)n * m;
    double d = gj[j];
    for (int i = 0; i < n; i++) {
        const double *li = L + (size_t)i * m;
        double v = gj[free[i]];
        for (int k = 0; k < i; k++)
            v -= li[k] * ln[k];
        v /= li[i];
        ln[i] = v;
        d -= v * v;
    }
    if (!(d > 0.0))
        return -1;
    ln[n] = sqrt(d);
    return 0;
}

/* z = -(L L^T)^{-1} c_F on the n free indices. */
static void face_solve(int m, const double *L, const int *free, int n, const double *c, double *z)
{
    for (int i = 0; i < n; i++) {
        const double *li = L + (size_t)i * m;
        double v = -c[free[i]];
        for (int k = 0; k < i; k++)
            v -= li[k] * z[k];
        z[i] = v / li[i];
    }
    for (int i = n - 1; i >= 0; i--) {
        double v = z[i];
        for (int k = i + 1; k < n; k++)
            v -= L[(size_t)k * m + i] * z[k];
        z[i] = v / L[(size_t)i * m + i];
    }
}

/* One row. s (out, m), lam (work, m), L (work, m*m), free/pos (work, m), z (work, m).
 * start (may be NULL): indices with start[i] != 0 are freed before the first step.
 * Returns the number of steps taken (>= 0), or -1 (no convergence within max_steps, or a
 * factorisation failed: the caller solves this row another way). */
static int solve_row(int m, const double *G, const double *c, const unsigned char *start,
                     double tol, int max_steps, double *s, double *lam, double *L, int *free,
                     double *z)
{
    int n = 0, steps = 0;
    memset(s, 0, sizeof(double) * (size_t)m);
    if (start != NULL) {
        for (int i = 0; i < m; i++)
            if (start[i])
                free[n++] = i;
        if (factor(m, G, free, n, L) != 0)
            n = 0;
    }
    for (;;) {
        /* Minimise on the face {s_i = 0 outside free}; step towards the face's minimiser,
         * stopping at the first bound it crosses, which leaves the free set. */
        for (;;) {
            if (++steps > max_steps)
                return -1;
            face_solve(m, L, free, n, c, z);
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
            /* Every free index at its bound leaves (the blocking one, and ties). */
            int kept = 0;
            for (int i = 0; i < n; i++) {
                int fi = free[i];
                if (i == block || (z[i] < 0.0 && s[fi] <= 0.0)) {
                    s[fi] = 0.0;
                } else {
                    free[kept++] = fi;
                }
            }
            n = kept;
            if (factor(m, G, free, n, L) != 0)
                return -1;
        }
        /* Multipliers of the bounds: lam = G s + c; free entries are 0 up to rounding. */
        for (int i = 0; i < m; i++)
            lam[i] = c[i];
        for (int k = 0; k < n; k++) {
            int fk = free[k];
            double sk = s[fk];
            const double *gk = G + (size_t)fk * m;
            for (int i = 0; i < m; i++)
                lam[i] += gk[i] * sk;
        }
        /* Every bound of negative multiplier (below -tol) is freed at once: the face
         * minimiser then has a lower objective, and the step towards it is a descent step. */
        int freed = 0;
        for (int i = 0; i < m; i++)
            z[i] = 0.0;
        for (int k = 0; k < n; k++)
            z[free[k]] = 1.0;
        for (int i = 0; i < m; i++) {
            if (z[i] == 0.0 && lam[i] < -tol) {
                if (BLOCK || freed == 0 || lam[i] < lam[free[n - 1]]) {
                    if (!BLOCK && freed) n--;
                    if (append(m, G, free, n, i, L) != 0)
                        return -1;
                    free[n++] = i;
                    freed = 1;
                }
            }
        }
        if (!freed)
            return steps;
    }
}

/* k rows: C and S are k x m (row-major), start is k x m or NULL, steps (out) has k entries.
 * tol[r] is row r's threshold on the multipliers. work: 2m + m*m doubles, m ints. */
void jdoptim_nnqp(int k, int m, const double *G, const double *C, const unsigned char *start,
                  const double *tol, int max_steps, double *S, int *steps, double *work,
                  int *iwork)
{
    double *lam = work, *z = work + m, *L = work + 2 * (size_t)m;
    for (int r = 0; r < k; r++) {
        steps[r] = solve_row(m, G, C + (size_t)r * m, start ? start + (size_t)r * m : NULL,
                             tol[r], max_steps, S + (size_t)r * m, lam, L, iwork, z);
    }
}
