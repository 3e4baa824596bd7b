/* Whole-model finite-difference gradient check (see model_gradcheck.h). */
#include "tests/harness/model_gradcheck.h"

#include <CUnit/CUnit.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/autograd.h"
#include "core/memory.h"

static double loss_at(moe_model *m, const int32_t *in, const int32_t *tg, int B, int T) {
    moe_loss_parts parts;
    moe_step_reset();
    if (moe_model_loss(m, in, tg, B, T, &parts) != MOE_OK) return NAN;
    return moe_tensor_item(parts.loss);
}

/* Central difference of the loss in x[j] with step h (the step actually taken in f32). */
static double numeric(moe_model *m, float *x, int64_t j, double h, const int32_t *in, const int32_t *tg, int B,
                      int T) {
    float x0 = x[j];
    x[j] = (float)(x0 + h);
    double hp = (double)x[j] - x0, lp = loss_at(m, in, tg, B, T);
    x[j] = (float)(x0 - h);
    double hm = x0 - (double)x[j], lm = loss_at(m, in, tg, B, T);
    x[j] = x0;
    return (lp - lm) / (hp + hm);
}

moe_gradcheck_result moe_test_model_gradcheck(const moe_config *cfg, int B, int T, int samples) {
    moe_gradcheck_result r = {0, 0};
    moe_model m;
    if (moe_model_init(&m, cfg, 0, 1) != MOE_OK) {
        fprintf(stderr, "  gradcheck: %s\n", moe_last_error());
        r.bad = 1;
        return r;
    }
    m.compute = MOE_F64;
    int V = cfg->model.vocab_size, n = B * T;
    int32_t *in = malloc(sizeof(int32_t) * (size_t)n), *tg = malloc(sizeof(int32_t) * (size_t)n);
    for (int i = 0; i < n; i++) {
        in[i] = (i * 7 + 3) % V;
        tg[i] = (i * 5 + 1) % V;
    }
    moe_loss_parts parts;
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_model_loss(&m, in, tg, B, T, &parts), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_backward(parts.loss), MOE_OK);
    bool was = moe_grad_set_enabled(false);
    for (int i = 0; i < m.n_params; i++) {
        moe_tensor *p = m.params[i].t;
        int64_t numel = moe_tensor_numel(p);
        double *g = malloc(sizeof(double) * (size_t)numel);
        moe_tensor_to_host_f64(p->grad, g);
        for (int s = 0; s < samples; s++) {
            int64_t j = (s * 7919 + i * 31) % numel;
            double d1 = numeric(&m, p->data, j, 1e-3, in, tg, B, T), d2 = numeric(&m, p->data, j, 5e-4, in, tg, B, T);
            if (fabs(d1 - d2) > 1e-3 * fmax(1e-3, fabs(d2))) continue; /* a routing change: kink */
            r.checked++;
            if (fabs(g[j] - d2) > 2e-3 * fmax(fabs(d2), 1e-2)) {
                fprintf(stderr, "  %s[%lld]: analytic %.8g numeric %.8g\n", m.params[i].name, (long long)j, g[j], d2);
                r.bad++;
            }
        }
        free(g);
    }
    moe_grad_set_enabled(was);
    free(in);
    free(tg);
    moe_model_free(&m);
    moe_step_reset();
    return r;
}
