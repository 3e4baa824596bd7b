/* Shared by the fuzz harnesses (tests/fuzz/fuzz_<target>.c): the two libFuzzer entry points
 * every harness defines (libFuzzer calls them; replay.c calls them without libFuzzer), a
 * per-process scratch file that inputs are written to for readers that take a path, and the
 * check that turns a broken property into a crash the fuzzer records. */
#ifndef MOE_TESTS_FUZZ_COMMON_H
#define MOE_TESTS_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/status.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Writes data[0..size) to this process's scratch file "<TMPDIR>/moe-fuzz-<tag>-<pid>"
 * (replaced on each call, removed at exit) and returns its path. Aborts when the file
 * cannot be written: the harness cannot run. */
const char *fuzz_write_file(const char *tag, const uint8_t *data, size_t size);

/* A per-process scratch directory "<TMPDIR>/moe-fuzz-<tag>-<pid>.d" for readers that take
 * a folder (created on the first call; removed with the files in it at exit). Aborts when it
 * cannot be created. */
const char *fuzz_scratch_dir(const char *tag);

/* Writes data[0..size) to dir/name (replaced); data NULL removes dir/name instead. Aborts
 * when the file cannot be written. */
void fuzz_put_file(const char *dir, const char *name, const uint8_t *data, size_t size);

/* A property of the reader failed: print it and abort (libFuzzer saves the input). */
#define FUZZ_CHECK(cond, ...) MOE_ASSERT(cond, __VA_ARGS__)

#endif
