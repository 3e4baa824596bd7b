/* Smoke test of `moe bench` (moe/bench/bench.h): every case at a reduced size for one rep,
 * checking the JSON lines' fields (present, finite, FLOPs as bench_reference.py counts
 * them), the argument parser, and the clean failure of the cuda cases without a device. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/device.h"
#include "moe/cli/bench.h"
#include "tests/harness/testlib.h"

#define MAX_LINES 8

typedef struct bench_output {
    char *text;
    int n_lines;
    char *lines[MAX_LINES];
} bench_output;

/* Runs one warm-up-free rep of a case at `scale` on its own device (device < 0) or on
 * `device`, with JSON into memory, and splits the lines; recompute: the LM cases'
 * --recompute (NULL: none). */
static moe_status run_case_on(const char *name, int scale, int device, const char *recompute, bench_output *res) {
    moe_bench_options o = moe_bench_options_default();
    o.device = device;
    o.recompute = recompute;
    o.warmup = 0;
    o.reps = 1;
    o.threads = 2;
    o.scale = scale;
    size_t len = 0;
    memset(res, 0, sizeof *res);
    o.out = open_memstream(&res->text, &len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(o.out);
    moe_status s = moe_bench_run(name, &o);
    fclose(o.out);
    for (char *save = NULL, *l = strtok_r(res->text, "\n", &save); l && res->n_lines < MAX_LINES;
         l = strtok_r(NULL, "\n", &save))
        res->lines[res->n_lines++] = l;
    return s;
}

static moe_status run_case(const char *name, int scale, const char *recompute, bench_output *res) {
    return run_case_on(name, scale, -1, recompute, res);
}

/* The number after "key": in a JSON line; NAN when the key is missing. */
static double num_field(const char *line, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(line, pat);
    if (!p) return NAN;
    char *end = NULL;
    double v = strtod(p + strlen(pat), &end);
    return end == p + strlen(pat) ? NAN : v;
}

/* True when "key":"value" is in the line. */
static bool str_field(const char *line, const char *key, const char *value) {
    char pat[128];
    snprintf(pat, sizeof pat, "\"%s\":\"%s\"", key, value);
    return strstr(line, pat) != NULL;
}

/* Checks the fields every figure carries; flops exact, timings finite and positive. */
static void check_line(const char *line, const char *name, const char *phase, const char *device, double flops,
                       int scale) {
    CU_ASSERT_TRUE(line[0] == '{' && line[strlen(line) - 1] == '}');
    CU_ASSERT_TRUE(str_field(line, "case", name));
    CU_ASSERT_TRUE(str_field(line, "phase", phase));
    CU_ASSERT_TRUE(str_field(line, "device", device));
    CU_ASSERT_TRUE(str_field(line, "dtype", strcmp(device, "cpu") ? "bf16" : "f32"));
    CU_ASSERT_TRUE(str_field(line, "impl", "moe"));
    CU_ASSERT_TRUE(str_field(line, "peak_kind", "step_arena+persist"));
    CU_ASSERT_DOUBLE_EQUAL(num_field(line, "flops"), flops, 0.5);
    double ms = num_field(line, "ms"), rate = num_field(line, "gflops_per_s");
    CU_ASSERT_TRUE(isfinite(ms) && ms > 0);
    CU_ASSERT_TRUE(isfinite(rate) && rate > 0);
    CU_ASSERT_DOUBLE_EQUAL(rate, flops / (ms * 1e-3) / 1e9, 0.01 * rate + 0.01);
    CU_ASSERT_PTR_NOT_NULL(strstr(line, "\"ms_all\":["));
    double peak = num_field(line, "peak_bytes");
    CU_ASSERT_TRUE(isfinite(peak) && peak > 0);
    CU_ASSERT_EQUAL(num_field(line, "reps"), 1);
    CU_ASSERT_EQUAL(num_field(line, "warmup"), 0);
    CU_ASSERT_EQUAL(num_field(line, "scale"), scale);
    CU_ASSERT_EQUAL(num_field(line, "threads"), 2);
}

/* SwiGLU expert FLOPs of a layer forward: 2 * T * k * 3 * d * f. */
static double layer_flops(double T, double k, double d, double f) { return 2 * T * k * 3 * d * f; }

static void check_layer_case(const char *name, const char *device, int scale, double T, double d, double f, double k) {
    bench_output r;
    CU_ASSERT_EQUAL_FATAL(run_case(name, scale, NULL, &r), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(r.n_lines, 2);
    check_line(r.lines[0], name, "fwd", device, layer_flops(T, k, d, f), scale);
    check_line(r.lines[1], name, "fwd_bwd", device, 3 * layer_flops(T, k, d, f), scale);
    free(r.text);
}

static void test_layer_cpu(void) {
    check_layer_case("moe-layer-cpu", "cpu", 64, 4096 / 64, 256, 704, 2);
}

static void test_lm_cpu(void) {
    bench_output r;
    CU_ASSERT_EQUAL_FATAL(run_case("lm-step-cpu", 8, NULL, &r), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(r.n_lines, 1);
    const char *l = r.lines[0];
    /* bench_reference.py's lm_flops for V 256, d 256, L 4, E 8, k 2, f 704, B 8/8, S 256:
     * active = 4 * (4 d^2 + d E + k 3 d f) + V d; flops = 6 active B S + 6 L B S^2 d. */
    double active = 4.0 * (4 * 256 * 256 + 256 * 8 + 2 * 3 * 256 * 704) + 256 * 256;
    CU_ASSERT_DOUBLE_EQUAL(active, 5447680, 0);
    check_line(l, "lm-step-cpu", "step", "cpu", 6 * active * 256 + 6.0 * 4 * 256 * 256 * 256, 8);
    CU_ASSERT_EQUAL(num_field(l, "active_matmul_params"), 5447680);
    CU_ASSERT_EQUAL(num_field(l, "tokens"), 256);
    CU_ASSERT_DOUBLE_EQUAL(num_field(l, "tokens_per_s"), 256 / (num_field(l, "ms") * 1e-3), 0.1);
    CU_ASSERT_PTR_NULL(strstr(l, "\"mfu\"")); /* MFU is against the H200 bf16 rate: cuda only */
    CU_ASSERT_TRUE(str_field(l, "recompute", "none"));
    double step_peak = num_field(l, "step_peak_bytes");
    CU_ASSERT_TRUE(step_peak > 0 && step_peak < num_field(l, "peak_bytes"));
    CU_ASSERT_TRUE(num_field(l, "step_capacity_bytes") >= step_peak); /* the arena held covers the peak */
    free(r.text);
    /* recomputing: the same FLOPs counted (the useful work), the setting named; a bad entry
     * refused by name */
    CU_ASSERT_EQUAL_FATAL(run_case("lm-step-cpu", 8, "experts,attention", &r), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(r.n_lines, 1);
    check_line(r.lines[0], "lm-step-cpu", "step", "cpu", 6 * active * 256 + 6.0 * 4 * 256 * 256 * 256, 8);
    CU_ASSERT_TRUE(str_field(r.lines[0], "recompute", "experts,attention"));
    free(r.text);
    CU_ASSERT_EQUAL(run_case("lm-step-cpu", 8, "expert", &r), MOE_ERR_CONFIG);
    CHECK_ERROR_HAS("'expert' is not allowed");
    CU_ASSERT_EQUAL(r.n_lines, 0);
    free(r.text);
}

static void test_sgemm_cpu(void) {
    bench_output r;
    CU_ASSERT_EQUAL_FATAL(run_case("sgemm", 16, NULL, &r), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(r.n_lines, 1);
    check_line(r.lines[0], "sgemm", "gemm", "cpu", 2.0 * 128 * 128 * 128, 16);
    CU_ASSERT_EQUAL(num_field(r.lines[0], "n"), 128);
    free(r.text);
}

/* The scan case on the CPU (f32), scale 16: 10 sequences of 32 steps, 4 heads of 128; four
 * phases, the step-by-step and chunked forms, forward and forward + backward. */
static void test_scan_cpu(void) {
    bench_output r;
    CU_ASSERT_EQUAL_FATAL(run_case_on("scan-gpu", 16, MOE_CPU, NULL, &r), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(r.n_lines, 4);
    const char *phases[4] = {"step_fwd", "step_fwd_bwd", "chunk_fwd", "chunk_fwd_bwd"};
    const double flops = 6.0 * 10 * 32 * 4 * 128 * 128;
    for (int i = 0; i < 4; i++) check_line(r.lines[i], "scan-gpu", phases[i], "cpu", i % 2 ? 3 * flops : flops, 16);
    free(r.text);
}

/* Without a device the cuda cases fail cleanly and write nothing; with one they run. */
static void test_cuda_cases(void) {
    static const char *names[] = {"moe-layer-gpu", "moe-layer-gpu-fine", "lm-train-gpu", "index-add-gpu", "scan-gpu",
                                  NULL};
    if (moe_device_available(MOE_CUDA)) {
        check_layer_case("moe-layer-gpu", "cuda", 64, 16384 / 64, 1024, 2816, 2);
        check_layer_case("moe-layer-gpu-fine", "cuda", 64, 16384 / 64, 2048, 1408, 6);
        bench_output r;
        CU_ASSERT_EQUAL_FATAL(run_case("lm-train-gpu", 16, NULL, &r), MOE_OK);
        CU_ASSERT_EQUAL_FATAL(r.n_lines, 1);
        double mfu = num_field(r.lines[0], "mfu");
        CU_ASSERT_TRUE(isfinite(mfu) && mfu > 0 && mfu < 1);
        free(r.text);
        /* 1024 bf16 rows of 768 into 256: src + ids read, the table read and written */
        CU_ASSERT_EQUAL_FATAL(run_case("index-add-gpu", 16, NULL, &r), MOE_OK);
        CU_ASSERT_EQUAL_FATAL(r.n_lines, 1);
        check_line(r.lines[0], "index-add-gpu", "index_add", "cuda", 1024.0 * 768, 16);
        CU_ASSERT_EQUAL(num_field(r.lines[0], "bytes"), 1024.0 * 768 * 2 + 4 * 1024 + 2 * 256.0 * 768 * 2);
        double gbs = num_field(r.lines[0], "gb_per_s");
        CU_ASSERT_TRUE(isfinite(gbs) && gbs > 0);
        free(r.text);
        CU_ASSERT_EQUAL_FATAL(run_case("scan-gpu", 16, NULL, &r), MOE_OK);
        CU_ASSERT_EQUAL(r.n_lines, 4);
        free(r.text);
        return;
    }
    for (int i = 0; names[i]; i++) {
        bench_output r;
        CU_ASSERT_EQUAL(run_case(names[i], 1, NULL, &r), MOE_ERR_UNSUPPORTED);
        CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "no cuda device"));
        CU_ASSERT_EQUAL(r.n_lines, 0);
        free(r.text);
    }
}

static void test_parse_args(void) {
    const char *name = NULL;
    moe_bench_options o;
    char *ok[] = {"moe-layer-cpu", "--reps", "7", "--warmup", "0", "--threads", "2", "--scale", "4",
                  "--device", "cuda", "--dtype", "f32", "--json", "--recompute", "experts"};
    CU_ASSERT_EQUAL_FATAL(moe_bench_parse_args(16, ok, &name, &o), MOE_OK);
    CU_ASSERT_STRING_EQUAL(o.recompute, "experts");
    CU_ASSERT_STRING_EQUAL(name, "moe-layer-cpu");
    CU_ASSERT_EQUAL(o.reps, 7);
    CU_ASSERT_EQUAL(o.warmup, 0);
    CU_ASSERT_EQUAL(o.threads, 2);
    CU_ASSERT_EQUAL(o.scale, 4);
    CU_ASSERT_EQUAL(o.device, MOE_CUDA);
    CU_ASSERT_EQUAL(o.dtype, MOE_F32);
    CU_ASSERT_TRUE(o.json);
    char *plain[] = {"sgemm"};
    CU_ASSERT_EQUAL_FATAL(moe_bench_parse_args(1, plain, &name, &o), MOE_OK);
    CU_ASSERT_TRUE(o.device == -1 && o.dtype == -1 && o.reps == 10 && o.warmup == 3 && o.scale == 1 && !o.json);
    char *bad_reps[] = {"sgemm", "--reps", "0"}, *bad_opt[] = {"sgemm", "--fast"}, *no_case[] = {"--json"},
         *two[] = {"sgemm", "lm-step-cpu"}, *missing[] = {"sgemm", "--reps"};
    CU_ASSERT_EQUAL(moe_bench_parse_args(3, bad_reps, &name, &o), MOE_ERR_CONFIG);
    CU_ASSERT_EQUAL(moe_bench_parse_args(2, bad_opt, &name, &o), MOE_ERR_CONFIG);
    CU_ASSERT_EQUAL(moe_bench_parse_args(1, no_case, &name, &o), MOE_ERR_CONFIG);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "sgemm, index-add-gpu, scan-gpu)")); /* the list of CASES */
    CU_ASSERT_EQUAL(moe_bench_parse_args(2, two, &name, &o), MOE_ERR_CONFIG);
    CU_ASSERT_EQUAL(moe_bench_parse_args(2, missing, &name, &o), MOE_ERR_CONFIG);
    bench_output r;
    CU_ASSERT_EQUAL(run_case("no-such-case", 1, NULL, &r), MOE_ERR_CONFIG);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "'no-such-case' (moe-layer-cpu, lm-step-cpu,"));
    CU_ASSERT_EQUAL(r.n_lines, 0);
    free(r.text);
}

static void register_suites(void) {
    moe_test_add_suite("bench", (moe_test_entry[]){{"parse_args", test_parse_args},
                                                   {"sgemm_cpu", test_sgemm_cpu},
                                                   {"layer_cpu", test_layer_cpu},
                                                   {"lm_cpu", test_lm_cpu},
                                                   {"scan_cpu", test_scan_cpu},
                                                   {"cuda_cases", test_cuda_cases},
                                                   {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
