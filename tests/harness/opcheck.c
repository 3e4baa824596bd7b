/* Generic gradient check and device parity check over op cases. */
#include "tests/harness/opcheck.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/memory.h"
#include "core/philox.h"

static double draw(op_input_kind k, int64_t i, uint64_t seed, int64_t hi, int64_t n) {
    double u = moe_philox_uniform((uint64_t)i, seed);
    switch (k) {
    case IN_NORMAL: return moe_philox_normal((uint64_t)i, seed);
    case IN_POSITIVE: return 0.5 + 1.5 * u;
    case IN_UNIT: return 0.05 + 0.9 * u;
    case IN_INDEX: return (double)((int64_t)(u * (double)hi) % hi);
    case IN_DISTINCT: {
        /* i-th value of a shuffled evenly spaced grid: distinct, gaps of 4/n. */
        uint64_t h = moe_philox4x32((uint64_t)i, seed).v[2] % (uint64_t)n;
        return -2.0 + 4.0 * ((double)((int64_t)h * 7919 % n) + 0.5 * u) / (double)n;
    }
    }
    return 0;
}

void opcheck_make_inputs(const op_case *c, moe_device dev, moe_dtype float_dt, uint64_t seed, moe_tensor **in) {
    for (int j = 0; j < c->n_in; j++) {
        const op_input_spec *s = &c->in[j];
        int64_t shape[MOE_MAX_DIMS];
        memcpy(shape, s->shape, sizeof shape);
        bool tr = s->transposed && s->ndim >= 2;
        if (tr) {
            shape[s->ndim - 1] = s->shape[s->ndim - 2];
            shape[s->ndim - 2] = s->shape[s->ndim - 1];
        }
        int64_t n = 1;
        for (int d = 0; d < s->ndim; d++) n *= shape[d];
        double *host = malloc(sizeof(double) * (size_t)(n ? n : 1));
        if (s->kind == IN_DISTINCT) {
            /* a true permutation of distinct grid values */
            for (int64_t i = 0; i < n; i++) host[i] = -2.0 + 4.0 * ((double)i + 0.5) / (double)n;
            for (int64_t i = n - 1; i > 0; i--) {
                int64_t r = (int64_t)(moe_philox4x32((uint64_t)i, seed + 17u * (uint64_t)j).v[0] % (uint64_t)(i + 1));
                double t = host[i];
                host[i] = host[r];
                host[r] = t;
            }
        } else {
            for (int64_t i = 0; i < n; i++) host[i] = draw(s->kind, i, seed + 17u * (uint64_t)j, s->index_hi, n);
        }
        moe_dtype dt = s->kind == IN_INDEX ? MOE_I32 : float_dt;
        moe_tensor *h64 = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F64, s->ndim, shape, host);
        free(host);
        moe_tensor *t = moe_tensor_empty(MOE_LIFE_PERSIST, dev, dt, s->ndim, shape);
        MOE_ASSERT(h64 && t && moe_tensor_copy_(t, h64) == MOE_OK, "making input %d: %s", j, moe_last_error());
        t->requires_grad = s->grad;
        t->is_param = s->grad;
        in[j] = t;
    }
}

/* A view of in[j] with the logical shape of the spec (undoes the stored transpose). */
static moe_tensor *logical_view(const op_case *c, int j, moe_tensor *t) {
    if (!(c->in[j].transposed && c->in[j].ndim >= 2)) return t;
    return moe_transpose(t, -1, -2);
}

static void free_inputs(const op_case *c, moe_tensor **in) {
    for (int j = 0; j < c->n_in; j++) moe_tensor_free(in[j]);
}

/* L = sum(out * R), R drawn from a fixed seed; out is returned too. */
static moe_tensor *loss_of(const op_case *c, moe_tensor **in, moe_tensor **out_keep) {
    moe_tensor *views[6];
    for (int j = 0; j < c->n_in; j++) views[j] = logical_view(c, j, in[j]);
    moe_tensor *out = c->run(views);
    if (out_keep) *out_keep = out;
    if (!out) return NULL;
    moe_tensor *r = moe_tensor_randn(MOE_LIFE_STEP, out->device, out->dtype, out->ndim, out->shape, 991, 0, 1.0);
    return moe_sum_all(moe_mul(moe_reshape(out, out->ndim, out->shape), r));
}

bool opcheck_gradcheck(const op_case *c, uint64_t seed, char *why, size_t cap) {
    moe_step_reset();
    moe_tensor *in[6] = {0};
    opcheck_make_inputs(c, MOE_CPU, MOE_F64, seed, in);
    moe_tensor *out = NULL;
    moe_tensor *loss = loss_of(c, in, &out);
    if (c->check) {
        bool ok = out && c->check(in, out, why, cap);
        if (!out) snprintf(why, cap, "op failed: %s", moe_last_error());
        free_inputs(c, in);
        return ok;
    }
    if (!loss) {
        snprintf(why, cap, "forward failed: %s", moe_last_error());
        free_inputs(c, in);
        return false;
    }
    if (moe_backward(loss) != MOE_OK) {
        snprintf(why, cap, "backward failed: %s", moe_last_error());
        free_inputs(c, in);
        return false;
    }
    double tol = c->grad_tol > 0 ? c->grad_tol : 1e-6;
    bool ok = true;
    int checked = 0;
    for (int j = 0; j < c->n_in && ok; j++) {
        if (!c->in[j].grad) continue;
        int64_t n = moe_tensor_numel(in[j]);
        double *analytic = malloc(sizeof(double) * (size_t)n);
        if (!in[j]->grad) {
            snprintf(why, cap, "input %d got no grad", j);
            free(analytic);
            ok = false;
            break;
        }
        moe_tensor_to_host_f64(in[j]->grad, analytic);
        double *x = in[j]->data;
        bool was = moe_grad_set_enabled(false);
        double amax = 0;
        for (int64_t i = 0; i < n; i++) amax = fmax(amax, fabs(analytic[i]));
        const int64_t stride = c->grad_samples > 0 && n > c->grad_samples ? n / c->grad_samples : 1;
        for (int64_t i = (stride - 1) / 2; i < n && ok; i += stride) {
            double x0 = x[i], h = 1e-5 * fmax(1.0, fabs(x0)), d[2];
            for (int k = 0; k < 2; k++) {
                double hk = k ? h / 2 : h;
                x[i] = x0 + hk;
                double lp = moe_tensor_item(loss_of(c, in, NULL));
                x[i] = x0 - hk;
                double lm = moe_tensor_item(loss_of(c, in, NULL));
                d[k] = (lp - lm) / (2 * hk);
            }
            x[i] = x0;
            double scale = fmax(fabs(d[1]), 1e-3 * fmax(amax, 1.0));
            if (fabs(d[0] - d[1]) > 1e-4 * fmax(1.0, fabs(d[1]))) continue; /* kink: masked */
            checked++;
            if (!(fabs(analytic[i] - d[1]) <= tol * scale + 1e-9)) {
                snprintf(why, cap, "input %d element %lld: analytic %.10g vs numeric %.10g", j, (long long)i,
                         analytic[i], d[1]);
                ok = false;
            }
        }
        moe_grad_set_enabled(was);
        free(analytic);
    }
    if (ok && checked == 0) {
        snprintf(why, cap, "no element could be checked");
        ok = false;
    }
    free_inputs(c, in);
    return ok;
}

static double norm_err(const double *a, const double *b, int64_t n, bool *bad) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(a[i]) || !isfinite(b[i])) *bad = true;
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return sqrt(num) / fmax(sqrt(den), 1e-30);
}

/* Runs forward + backward on a device; fills host copies of out and grads. */
static bool run_on(const op_case *c, moe_device dev, moe_dtype dt, uint64_t seed, double **out, int64_t *nout,
                   double **grads, char *why, size_t cap) {
    moe_step_reset();
    moe_mem_set_poison(true);
    moe_tensor *in[6] = {0};
    opcheck_make_inputs(c, dev, dt, seed, in);
    moe_tensor *o = NULL;
    moe_tensor *loss = loss_of(c, in, &o);
    bool ok = o != NULL;
    if (ok && !c->check && loss) ok = moe_backward(loss) == MOE_OK;
    if (!ok) snprintf(why, cap, "%s run failed: %s", moe_device_name(dev), moe_last_error());
    if (ok) {
        *nout = moe_tensor_numel(o);
        *out = malloc(sizeof(double) * (size_t)(*nout ? *nout : 1));
        moe_tensor_to_host_f64(o, *out);
        for (int j = 0; j < c->n_in; j++) {
            grads[j] = NULL;
            if (c->check || !c->in[j].grad || !in[j]->grad) continue;
            grads[j] = malloc(sizeof(double) * (size_t)moe_tensor_numel(in[j]));
            moe_tensor_to_host_f64(in[j]->grad, grads[j]);
        }
    }
    moe_mem_set_poison(false);
    free_inputs(c, in);
    return ok;
}

bool opcheck_parity(const op_case *c, moe_device dev, moe_dtype dt, uint64_t seed, char *why, size_t cap) {
    double *oa = NULL, *ob = NULL, *ga[6] = {0}, *gb[6] = {0};
    int64_t na = 0, nb = 0;
    bool ok = run_on(c, MOE_CPU, MOE_F32, seed, &oa, &na, ga, why, cap) &&
              run_on(c, dev, dt, seed, &ob, &nb, gb, why, cap);
    double tol = c->parity_tol > 0 ? c->parity_tol : 1e-5;
    if (dt == MOE_BF16) tol = fmax(tol, 2e-2);
    if (ok) {
        bool bad = false;
        double e = norm_err(ob, oa, na, &bad);
        if (bad || !(e <= tol)) {
            snprintf(why, cap, "output differs: normalised error %.3g (tol %.1g)%s", e, tol, bad ? ", non-finite values" : "");
            ok = false;
        }
        for (int j = 0; ok && j < c->n_in; j++) {
            if (!ga[j] && !gb[j]) continue;
            if (!ga[j] || !gb[j]) {
                snprintf(why, cap, "input %d has a grad on one device only", j);
                ok = false;
                break;
            }
            int64_t n = 1;
            for (int d = 0; d < c->in[j].ndim; d++) n *= c->in[j].shape[d];
            e = norm_err(gb[j], ga[j], n, &bad);
            if (bad || !(e <= tol)) {
                snprintf(why, cap, "grad of input %d differs: normalised error %.3g (tol %.1g)%s", j, e, tol,
                         bad ? ", non-finite values" : "");
                ok = false;
            }
        }
    }
    free(oa);
    free(ob);
    for (int j = 0; j < 6; j++) {
        free(ga[j]);
        free(gb[j]);
    }
    return ok;
}

bool opcheck_matches(moe_tensor *out, moe_tensor *ref, double rel, const char *ref_name, char *why, size_t cap) {
    int64_t n = moe_tensor_numel(out);
    double *a = malloc(sizeof(double) * (size_t)n), *b = malloc(sizeof(double) * (size_t)n);
    bool ok = ref && a && b && moe_tensor_same_shape(ref, out) && moe_tensor_to_host_f64(out, a) == MOE_OK &&
              moe_tensor_to_host_f64(ref, b) == MOE_OK;
    if (!ok) snprintf(why, cap, "the reference failed or the output has the wrong shape");
    for (int64_t i = 0; ok && i < n; i++)
        if (fabs(a[i] - b[i]) > rel * (1 + fabs(b[i]))) {
            snprintf(why, cap, "element %lld: got %.17g, %s give %.17g", (long long)i, a[i], ref_name, b[i]);
            ok = false;
        }
    free(a), free(b);
    return ok;
}
