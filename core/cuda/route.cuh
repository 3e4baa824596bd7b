/* A router's selection of one row of logits by one warp (core/cpu/index_cpu.c's ROUTE_TOPK is
 * the specification), shared by the route_topk kernels and the fused gate projection's last
 * block (route_select): the softmax's max and sum first, then k rounds each taking the best
 * p + bias ordered after the previous pick (topk_merge's order), with p recomputed from the
 * logits; rows of up to 128 experts keep their logits in registers. At the end each pick's
 * gate is recomputed from its logit, renormalised and scaled in f32 before the one rounding
 * to the gates' dtype. The logits are read through L2 (they may have been written by other
 * blocks of the same kernel). */
#ifndef MOE_CUDA_ROUTE_CUH
#define MOE_CUDA_ROUTE_CUH

#include "core/cuda/cuda_common.cuh"

extern "C" {
#include "core/ops.h" /* moe_route_spec */
}

/* (v, i) <- (v2, i2) when it comes first: larger value, then lower index; NaN last. */
__device__ __forceinline__ void topk_merge(float &v, int &i, float v2, int i2) {
    if (v2 > v || (v2 == v && i2 < i) || (v != v && v2 == v2)) {
        v = v2;
        i = i2;
    }
}

/* The warp's best (value, index) under topk_merge's order, in every lane. */
__device__ __forceinline__ void topk_warp_merge(float &v, int &i) {
    for (int o = 16; o > 0; o >>= 1) {
        float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        int i2 = __shfl_xor_sync(0xffffffffu, i, o);
        topk_merge(v, i, v2, i2);
    }
}

__device__ __forceinline__ float route_score(float l, float mx, float sum, bool sigmoid) {
    return sigmoid ? 1.0f / (1.0f + expf(-l)) : expf(l - mx) / sum;
}

/* A pick's gate from its logit: its score, renormalised by the picks' total and scaled, in f32. */
__device__ __forceinline__ float route_gate(float l, float mx, float sum, float total, const moe_route_spec &sp) {
    float g = route_score(l, mx, sum, sp.sigmoid);
    if (sp.renormalize) g /= total;
    if (sp.scale > 0) g *= (float)sp.scale;
    return g;
}

/* After a row's k rounds: each lane's slots' gates recomputed from their ids (lane 0
 * wrote them). */
template <class T>
__device__ __forceinline__ void route_write_gates(const T *row, const int32_t *row_ids, T *row_gates, int lane, float mx,
                                                  float sum, float total, const moe_route_spec &sp) {
    __syncwarp(); /* lane 0's id writes, visible to the lanes that read them */
    for (int t = lane; t < sp.k; t += 32) stf(row_gates + t, route_gate(ldcgf(row + row_ids[t]), mx, sum, total, sp));
}

/* One row of E logits read from memory in every round (any E): gates and ids [k]. */
template <class T>
__device__ void route_row_mem(const T *row, const float *bias, T *gates, int32_t *ids, int E, const moe_route_spec &sp,
                              int lane) {
    float mx = -INFINITY, sum = 0.0f;
    if (!sp.sigmoid) {
        for (int e = lane; e < E; e += 32) mx = fmaxf(mx, ldcgf(row + e));
        mx = cu_warp_max(mx);
        for (int e = lane; e < E; e += 32) sum += expf(ldcgf(row + e) - mx);
        sum = cu_warp_sum(sum);
    }
    float pv = INFINITY, total = 0.0f;
    int pi = -1;
    for (int t = 0; t < sp.k; t++) {
        float bv = NAN;
        int bi = INT_MAX;
        for (int e = lane; e < E; e += 32) {
            float v = route_score(ldcgf(row + e), mx, sum, sp.sigmoid) + (bias ? bias[e] : 0.0f);
            if (v < pv || (v == pv && e > pi)) topk_merge(bv, bi, v, e);
        }
        topk_warp_merge(bv, bi);
        const int id = bi == INT_MAX ? 0 : bi;
        total += route_score(ldcgf(row + id), mx, sum, sp.sigmoid);
        if (lane == 0) ids[t] = id;
        pv = bv;
        pi = bi;
    }
    route_write_gates(row, ids, gates, lane, mx, sum, total, sp);
}

/* route_row_mem for rows of at most 32 RT experts: each lane keeps its RT logits and scores
 * in registers, so the k rounds read no memory and compute no exp (the same values and
 * comparisons, in the same order: the same ids and gates); for k <= 32 lane t also keeps
 * pick t's id and logit and writes both at the end. */
template <class T, int RT>
__device__ void route_row_regs(const T *row, const float *bias, T *gates, int32_t *ids, int E, const moe_route_spec &sp,
                               int lane) {
    float l[RT], sc[RT], mx = -INFINITY, sum = 0.0f;
#pragma unroll
    for (int q = 0; q < RT; q++) l[q] = lane + 32 * q < E ? ldcgf(row + lane + 32 * q) : 0.0f;
    if (!sp.sigmoid) {
#pragma unroll
        for (int q = 0; q < RT; q++)
            if (lane + 32 * q < E) mx = fmaxf(mx, l[q]);
        mx = cu_warp_max(mx);
#pragma unroll
        for (int q = 0; q < RT; q++)
            if (lane + 32 * q < E) sum += expf(l[q] - mx);
        sum = cu_warp_sum(sum);
    }
#pragma unroll
    for (int q = 0; q < RT; q++)
        sc[q] = route_score(l[q], mx, sum, sp.sigmoid) + (bias && lane + 32 * q < E ? bias[lane + 32 * q] : 0.0f);
    float pv = INFINITY, total = 0.0f, my_l = 0.0f;
    int pi = -1, my_id = 0;
    for (int t = 0; t < sp.k; t++) {
        float bv = NAN;
        int bi = INT_MAX;
#pragma unroll
        for (int q = 0; q < RT; q++) {
            const int e = lane + 32 * q;
            if (e < E && (sc[q] < pv || (sc[q] == pv && e > pi))) topk_merge(bv, bi, sc[q], e);
        }
        topk_warp_merge(bv, bi);
        const int id = bi == INT_MAX ? 0 : bi;
        float lid = 0.0f; /* the chosen expert's logit, from the lane that holds it */
#pragma unroll
        for (int q = 0; q < RT; q++)
            if (q == id / 32) lid = l[q];
        lid = __shfl_sync(0xffffffffu, lid, id % 32);
        total += route_score(lid, mx, sum, sp.sigmoid);
        if (lane == t) my_id = id, my_l = lid;
        if (sp.k > 32 && lane == 0) ids[t] = id;
        pv = bv;
        pi = bi;
    }
    if (sp.k > 32) {
        route_write_gates(row, ids, gates, lane, mx, sum, total, sp);
    } else if (lane < sp.k) {
        ids[lane] = my_id;
        stf(gates + lane, route_gate(my_l, mx, sum, total, sp));
    }
}

/* The registers' form for up to 128 experts (RT 1, 2 or 4 logits a lane), else memory's. */
template <class T>
__device__ void route_row(const T *row, const float *bias, T *gates, int32_t *ids, int E, const moe_route_spec &sp,
                          int lane) {
    if (E <= 32) route_row_regs<T, 1>(row, bias, gates, ids, E, sp, lane);
    else if (E <= 64) route_row_regs<T, 2>(row, bias, gates, ids, E, sp, lane);
    else if (E <= 128) route_row_regs<T, 4>(row, bias, gates, ids, E, sp, lane);
    else route_row_mem<T>(row, bias, gates, ids, E, sp, lane);
}

#endif
