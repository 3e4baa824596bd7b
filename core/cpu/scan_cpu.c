/* CPU kernels of the gated delta-rule / gated linear-attention scan (DELTA_SCAN and
 * DELTA_SCAN_BWD, conventions in core/kernels.h at moe_scan_attrs).
 *
 * Each (n, h) pair is an independent recurrence; OpenMP spreads the pairs over threads.
 * Inputs are F32 or F64 and contiguous; every step's vectors are converted into small
 * double buffers, so the state and all arithmetic are double whatever the storage (the
 * O(dk dv) work per step dominates the O(dk + dv) conversions).
 *
 * Notation per (n, h), S is dk x dv row-major, w the effective write value:
 *   delta: u = S_{t-1}^T k_t, w_t = beta_t (v_t - alpha_t u), S_t = alpha_t S_{t-1} + k_t w_t^T
 *   gla:   w_t = v_t,                                       S_t = alpha_t S_{t-1} + k_t w_t^T
 *   o_t = S_t^T q_t.
 * Chunked form over a chunk of C steps r = 0..C-1 from the state S0 before it, with
 * R[r][s] = prod_{j=s+1..r} alpha_j (s <= r) and gamma_r = prod_{j=0..r} alpha_j:
 *   S_r = gamma_r S0 + sum_{s<=r} R[r][s] k_s w_s^T, hence (delta) the triangular system
 *   w_r + beta_r sum_{s<r} R[r][s] (k_r . k_s) w_s = beta_r (v_r - gamma_r S0^T k_r),
 *   i.e. W = (I + diag(beta) L)^{-1} diag(beta) (V - diag(gamma) K S0), the UT transform of
 *   the WY representation, solved here by forward substitution; then
 *   o_r = gamma_r S0^T q_r + sum_{s<=r} R[r][s] (q_r . k_s) w_s and
 *   S_C = gamma_{C-1} S0 + sum_s R[C-1][s] k_s w_s^T.
 * The products R are formed by multiplication (no division by cumulative decays), so an
 * alpha of 0 is exact. */
#include <stdlib.h>
#include <string.h>

#include "core/cpu/cpu_common.h"

typedef struct {
    int64_t N, T, H, dk, dv, chunk, n_chunks;
    bool delta;
} scan_dims;

static void load_vec(double *dst, const moe_tensor *t, int64_t off, int64_t n) {
    if (t->dtype == MOE_F64) {
        memcpy(dst, (const double *)t->data + off, sizeof(double) * (size_t)n);
    } else {
        const float *p = (const float *)t->data + off;
        for (int64_t i = 0; i < n; i++) dst[i] = p[i];
    }
}

static void store_vec(moe_tensor *t, int64_t off, const double *src, int64_t n) {
    if (t->dtype == MOE_F64) {
        memcpy((double *)t->data + off, src, sizeof(double) * (size_t)n);
    } else {
        float *p = (float *)t->data + off;
        for (int64_t i = 0; i < n; i++) p[i] = (float)src[i];
    }
}

static double load_one(const moe_tensor *t, int64_t off) {
    return t->dtype == MOE_F64 ? ((const double *)t->data)[off] : ((const float *)t->data)[off];
}

static moe_status check_dtypes(const moe_kernel_args *a, const char *kname, int n) {
    for (int i = 0; i < n; i++)
        if (a->in[i] && a->in[i]->dtype != MOE_F32 && a->in[i]->dtype != MOE_F64)
            return moe_error(MOE_ERR_UNSUPPORTED, "%s: dtype %s is not supported on cpu (f32, f64)", kname,
                             moe_dtype_name(a->in[i]->dtype));
    return MOE_OK;
}

static scan_dims dims_of(const moe_kernel_args *a) {
    const moe_scan_attrs *at = a->attrs;
    const moe_tensor *q = a->in[0];
    scan_dims d = {q->shape[0], q->shape[1], q->shape[2], q->shape[3], a->in[2]->shape[3], at->chunk, 0, at->delta};
    d.n_chunks = (d.T + d.chunk - 1) / d.chunk;
    return d;
}

/* Element offsets: row (n, t, h) of q/k/v, scalar (n, t, h) of beta/alpha, state (n, h). */
static int64_t tok(const scan_dims *d, int64_t n, int64_t t, int64_t h) { return (n * d->T + t) * d->H + h; }

/* One step in place on S; u (dv) is scratch. */
static void scan_step(const scan_dims *d, double *S, const double *k, const double *v, double beta, double alpha,
                      double *w) {
    const int64_t dk = d->dk, dv = d->dv;
    if (d->delta) {
        for (int64_t j = 0; j < dv; j++) w[j] = 0;
        for (int64_t i = 0; i < dk; i++)
            for (int64_t j = 0; j < dv; j++) w[j] += k[i] * S[i * dv + j];
        for (int64_t j = 0; j < dv; j++) w[j] = beta * (v[j] - alpha * w[j]);
    } else {
        memcpy(w, v, sizeof(double) * (size_t)dv);
    }
    for (int64_t i = 0; i < dk; i++)
        for (int64_t j = 0; j < dv; j++) S[i * dv + j] = alpha * S[i * dv + j] + k[i] * w[j];
}

/* o = S^T q */
static void state_times(const scan_dims *d, const double *S, const double *q, double *o) {
    for (int64_t j = 0; j < d->dv; j++) o[j] = 0;
    for (int64_t i = 0; i < d->dk; i++)
        for (int64_t j = 0; j < d->dv; j++) o[j] += q[i] * S[i * d->dv + j];
}

/* Four partial sums, so that the compiler can vectorise the loop (a single running sum
 * is a dependency chain it must keep in order). */
static double dot(const double *x, const double *y, int64_t n) {
    double s[4] = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int j = 0; j < 4; j++) s[j] += x[i + j] * y[i + j];
    for (; i < n; i++) s[0] += x[i] * y[i];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

/* Per-thread work buffers for one chunk of up to C steps. */
typedef struct {
    double *S, *Q, *K, *V, *G, *B, *A, *R, *gam, *W, *tmp, *Sb;
} scan_buf;

static bool buf_alloc(scan_buf *b, const scan_dims *d, bool backward) {
    const int64_t C = d->chunk, dk = d->dk, dv = d->dv;
    size_t n = (size_t)(dk * dv + 2 * C * dk + 2 * C * dv + 3 * C + C * C + C * dv + dk + dv);
    if (backward) n += (size_t)((C + 1) * dk * dv);
    double *p = malloc(sizeof(double) * n);
    if (!p) return false;
    b->S = p;
    b->Q = b->S + dk * dv;
    b->K = b->Q + C * dk;
    b->V = b->K + C * dk;
    b->G = b->V + C * dv;
    b->B = b->G + C * dv;
    b->A = b->B + C;
    b->gam = b->A + C;
    b->R = b->gam + C;
    b->W = b->R + C * C;
    b->tmp = b->W + C * dv;
    b->Sb = backward ? b->tmp + dk + dv : NULL;
    return true;
}

/* Loads steps [t0, t0 + cn) of pair (n, h) into Q, K, V, B, A (and G = in[5] rows when g). */
static void load_chunk(const moe_kernel_args *a, const scan_dims *d, scan_buf *b, int64_t n, int64_t h, int64_t t0,
                       int64_t cn, bool g) {
    for (int64_t r = 0; r < cn; r++) {
        int64_t e = tok(d, n, t0 + r, h);
        load_vec(b->Q + r * d->dk, a->in[0], e * d->dk, d->dk);
        load_vec(b->K + r * d->dk, a->in[1], e * d->dk, d->dk);
        load_vec(b->V + r * d->dv, a->in[2], e * d->dv, d->dv);
        b->B[r] = load_one(a->in[3], e);
        b->A[r] = load_one(a->in[4], e);
        if (g) load_vec(b->G + r * d->dv, a->in[5], e * d->dv, d->dv);
    }
}

/* The chunked form on one chunk: writes o rows and advances b->S (see the file comment). */
static void chunk_forward(const scan_dims *d, scan_buf *b, int64_t cn, moe_tensor *o, int64_t n, int64_t h,
                          int64_t t0) {
    const int64_t C = d->chunk, dk = d->dk, dv = d->dv;
    double *R = b->R, *W = b->W, *S = b->S, *tmp = b->tmp;
    for (int64_t r = 0; r < cn; r++) {
        R[r * C + r] = 1;
        for (int64_t s = r; s > 0; s--) R[r * C + s - 1] = R[r * C + s] * b->A[s];
        b->gam[r] = R[r * C] * b->A[0];
    }
    for (int64_t r = 0; r < cn; r++) {
        double *wr = W + r * dv;
        const double *kr = b->K + r * dk;
        if (!d->delta) {
            memcpy(wr, b->V + r * dv, sizeof(double) * (size_t)dv);
            continue;
        }
        state_times(d, S, kr, tmp);
        for (int64_t j = 0; j < dv; j++) wr[j] = b->B[r] * (b->V[r * dv + j] - b->gam[r] * tmp[j]);
        for (int64_t s = 0; s < r; s++) {
            double c = b->B[r] * R[r * C + s] * dot(kr, b->K + s * dk, dk);
            for (int64_t j = 0; j < dv; j++) wr[j] -= c * W[s * dv + j];
        }
    }
    for (int64_t r = 0; r < cn; r++) {
        const double *qr = b->Q + r * dk;
        state_times(d, S, qr, tmp);
        for (int64_t j = 0; j < dv; j++) tmp[j] *= b->gam[r];
        for (int64_t s = 0; s <= r; s++) {
            double c = R[r * C + s] * dot(qr, b->K + s * dk, dk);
            for (int64_t j = 0; j < dv; j++) tmp[j] += c * W[s * dv + j];
        }
        store_vec(o, tok(d, n, t0 + r, h) * dv, tmp, dv);
    }
    const double gl = b->gam[cn - 1];
    for (int64_t i = 0; i < dk * dv; i++) S[i] *= gl;
    for (int64_t s = 0; s < cn; s++) {
        double c = R[(cn - 1) * C + s];
        for (int64_t i = 0; i < dk; i++) {
            double ki = c * b->K[s * dk + i];
            for (int64_t j = 0; j < dv; j++) S[i * dv + j] += ki * W[s * dv + j];
        }
    }
}

moe_status moe_cpu_delta_scan(const moe_kernel_args *a) {
    MOE_TRY(check_dtypes(a, "delta_scan", 6));
    const moe_scan_attrs *at = a->attrs;
    const scan_dims d = dims_of(a);
    const int64_t SS = d.dk * d.dv;
    int failed = 0;
#pragma omp parallel
    {
        scan_buf b;
        bool ok = buf_alloc(&b, &d, false);
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic)
        for (int64_t p = 0; p < d.N * d.H; p++) {
            if (!ok) continue;
            const int64_t n = p / d.H, h = p % d.H;
            if (a->in[5]) load_vec(b.S, a->in[5], p * SS, SS);
            else memset(b.S, 0, sizeof(double) * (size_t)SS);
            for (int64_t c = 0; c < d.n_chunks; c++) {
                const int64_t t0 = c * d.chunk, cn = d.T - t0 < d.chunk ? d.T - t0 : d.chunk;
                if (at->ckpt) store_vec(at->ckpt, (p * d.n_chunks + c) * SS, b.S, SS);
                load_chunk(a, &d, &b, n, h, t0, cn, false);
                if (at->chunked) {
                    chunk_forward(&d, &b, cn, a->out, n, h, t0);
                    continue;
                }
                for (int64_t r = 0; r < cn; r++) {
                    scan_step(&d, b.S, b.K + r * d.dk, b.V + r * d.dv, b.B[r], b.A[r], b.tmp);
                    state_times(&d, b.S, b.Q + r * d.dk, b.tmp);
                    store_vec(a->out, tok(&d, n, t0 + r, h) * d.dv, b.tmp, d.dv);
                }
            }
            if (a->out2) store_vec(a->out2, p * SS, b.S, SS);
        }
        if (ok) free(b.S);
    }
    if (failed) return moe_error(MOE_ERR_OOM, "delta_scan: out of host memory for the per-thread chunk buffers");
    return MOE_OK;
}

/* Reverse-time recurrence (derivation in the file comment's notation, u = S_{t-1}^T k,
 * w' = v - alpha u, dw = beta dS^T k, du = -alpha dw):
 *   dS += q g^T; dq = S_t g; dbeta = k . (dS w'); dalpha = <dS, S_{t-1}> - dw . u;
 *   dk = beta dS w' + S_{t-1} du; dv = dw; dS <- alpha dS + k du^T   (delta)
 *   dalpha = <dS, S_{t-1}>; dk = dS v; dv = dS^T k; dbeta = 0; dS <- alpha dS   (gla). */
static void step_backward(const scan_dims *d, double *dS, const double *Sp, const double *St, const double *q,
                          const double *k, const double *v, const double *g, double beta, double alpha,
                          double *dq, double *dk, double *dv, double *dbeta, double *dalpha, double *u) {
    const int64_t nk = d->dk, nv = d->dv;
    for (int64_t i = 0; i < nk; i++)
        for (int64_t j = 0; j < nv; j++) dS[i * nv + j] += q[i] * g[j];
    for (int64_t i = 0; i < nk; i++) dq[i] = dot(St + i * nv, g, nv);
    double da = 0;
    for (int64_t i = 0; i < nk * nv; i++) da += dS[i] * Sp[i];
    state_times(d, dS, k, dv); /* dS^T k */
    if (!d->delta) {
        for (int64_t i = 0; i < nk; i++) dk[i] = dot(dS + i * nv, v, nv);
        *dbeta = 0;
        *dalpha = da;
        for (int64_t i = 0; i < nk * nv; i++) dS[i] *= alpha;
        return;
    }
    double *w = u + nv;
    state_times(d, Sp, k, u);
    for (int64_t j = 0; j < nv; j++) {
        w[j] = v[j] - alpha * u[j];
        dv[j] *= beta; /* dw */
        da -= dv[j] * u[j];
    }
    double db = 0;
    for (int64_t i = 0; i < nk; i++) {
        double sw = dot(dS + i * nv, w, nv), sdu = 0;
        for (int64_t j = 0; j < nv; j++) sdu -= alpha * Sp[i * nv + j] * dv[j];
        db += k[i] * sw;
        dk[i] = beta * sw + sdu;
    }
    for (int64_t i = 0; i < nk; i++)
        for (int64_t j = 0; j < nv; j++) dS[i * nv + j] = alpha * dS[i * nv + j] - alpha * k[i] * dv[j];
    *dbeta = db;
    *dalpha = da;
}

moe_status moe_cpu_delta_scan_bwd(const moe_kernel_args *a) {
    MOE_TRY(check_dtypes(a, "delta_scan_bwd", 6));
    const moe_scan_attrs *at = a->attrs;
    const scan_dims d = dims_of(a);
    const int64_t SS = d.dk * d.dv, dk = d.dk, dv = d.dv;
    int failed = 0;
#pragma omp parallel
    {
        scan_buf b;
        bool ok = buf_alloc(&b, &d, true);
        double *gq = ok ? malloc(sizeof(double) * (size_t)(2 * dk + 3 * dv)) : NULL;
        if (!gq) {
            ok = false;
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic)
        for (int64_t p = 0; p < d.N * d.H; p++) {
            if (!ok) continue;
            const int64_t n = p / d.H, h = p % d.H;
            double *gk = gq + dk, *gv = gk + dk, *u = gv + dv;
            memset(b.S, 0, sizeof(double) * (size_t)SS); /* b.S holds dS */
            for (int64_t c = d.n_chunks - 1; c >= 0; c--) {
                const int64_t t0 = c * d.chunk, cn = d.T - t0 < d.chunk ? d.T - t0 : d.chunk;
                load_chunk(a, &d, &b, n, h, t0, cn, true);
                load_vec(b.Sb, at->ckpt, (p * d.n_chunks + c) * SS, SS);
                for (int64_t r = 0; r < cn; r++) {
                    memcpy(b.Sb + (r + 1) * SS, b.Sb + r * SS, sizeof(double) * (size_t)SS);
                    scan_step(&d, b.Sb + (r + 1) * SS, b.K + r * dk, b.V + r * dv, b.B[r], b.A[r], b.tmp);
                }
                for (int64_t r = cn - 1; r >= 0; r--) {
                    double gb, ga;
                    step_backward(&d, b.S, b.Sb + r * SS, b.Sb + (r + 1) * SS, b.Q + r * dk, b.K + r * dk,
                                  b.V + r * dv, b.G + r * dv, b.B[r], b.A[r], gq, gk, gv, &gb, &ga, u);
                    int64_t e = tok(&d, n, t0 + r, h);
                    store_vec(a->out, e * dk, gq, dk);
                    store_vec(at->dk, e * dk, gk, dk);
                    store_vec(at->dv, e * dv, gv, dv);
                    store_vec(at->dbeta, e, &gb, 1);
                    store_vec(at->dalpha, e, &ga, 1);
                }
            }
            if (at->dstate0) store_vec(at->dstate0, p * SS, b.S, SS);
        }
        if (ok) free(b.S);
        free(gq);
    }
    if (failed) return moe_error(MOE_ERR_OOM, "delta_scan_bwd: out of host memory for the per-thread buffers");
    return MOE_OK;
}
