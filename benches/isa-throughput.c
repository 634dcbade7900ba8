// Multiply-add throughput of this CPU's AVX2 instructions, to bound batched CPU decode
// (benches/README.md, "Against the targets"): 12 independent accumulators per loop, so each
// number is issue throughput, not latency.
//   gcc -O2 benches/isa-throughput.c -o /tmp/isa -lpthread && /tmp/isa
// vfmadd231ps: 8 f32 multiply-adds; vpmaddwd: 16 i16 x i16 products summed in pairs into 8 i32
// (vpaddd then accumulates them); vpmaddubsw: 32 u8 x i8 products summed in pairs into 16
// saturating i16. The last line runs the FMA loop on two threads at once: the two cores'
// combined peak.
#include <pthread.h>
#include <stdio.h>
#include <time.h>

#define N 240000000L
#define ACCS "ymm0", "ymm1", "ymm2", "ymm3", "ymm4", "ymm5", "ymm6", "ymm7", "ymm8", "ymm9", "ymm10", "ymm11"
// One instruction into each of the 12 accumulators.
#define TWELVE(op)                                                                   \
    op " %%ymm14,%%ymm15,%%ymm0\n " op " %%ymm14,%%ymm15,%%ymm1\n "                  \
    op " %%ymm14,%%ymm15,%%ymm2\n " op " %%ymm14,%%ymm15,%%ymm3\n "                  \
    op " %%ymm14,%%ymm15,%%ymm4\n " op " %%ymm14,%%ymm15,%%ymm5\n "                  \
    op " %%ymm14,%%ymm15,%%ymm6\n " op " %%ymm14,%%ymm15,%%ymm7\n "                  \
    op " %%ymm14,%%ymm15,%%ymm8\n " op " %%ymm14,%%ymm15,%%ymm9\n "                  \
    op " %%ymm14,%%ymm15,%%ymm10\n " op " %%ymm14,%%ymm15,%%ymm11\n"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void* fma_loop(void* arg) {
    (void)arg;
    for (long i = 0; i < N / 12; i++) __asm__ volatile(TWELVE("vfmadd231ps")::: ACCS);
    return 0;
}

static void* madd_loop(void* arg) {
    (void)arg;
    for (long i = 0; i < N / 12; i++) __asm__ volatile(TWELVE("vpmaddwd")::: ACCS);
    return 0;
}

static void* maddubs_loop(void* arg) {
    (void)arg;
    for (long i = 0; i < N / 12; i++) __asm__ volatile(TWELVE("vpmaddubsw")::: ACCS);
    return 0;
}

// Six vpmaddwd, each accumulated by a vpaddd: how an i16 dot product really runs.
static void* madd_add_loop(void* arg) {
    (void)arg;
    for (long i = 0; i < N / 12; i++) {
        __asm__ volatile(
            "vpmaddwd %%ymm14,%%ymm15,%%ymm0\n vpaddd %%ymm0,%%ymm1,%%ymm1\n"
            "vpmaddwd %%ymm14,%%ymm15,%%ymm2\n vpaddd %%ymm2,%%ymm3,%%ymm3\n"
            "vpmaddwd %%ymm14,%%ymm15,%%ymm4\n vpaddd %%ymm4,%%ymm5,%%ymm5\n"
            "vpmaddwd %%ymm14,%%ymm15,%%ymm6\n vpaddd %%ymm6,%%ymm7,%%ymm7\n"
            "vpmaddwd %%ymm14,%%ymm15,%%ymm8\n vpaddd %%ymm8,%%ymm9,%%ymm9\n"
            "vpmaddwd %%ymm14,%%ymm15,%%ymm10\n vpaddd %%ymm10,%%ymm11,%%ymm11\n" ::: ACCS);
    }
    return 0;
}

// Seconds for `loop` on `threads` threads at once.
static double timed(void* (*loop)(void*), int threads) {
    pthread_t th[2];
    const double t = now();
    for (int i = 0; i < threads; i++) pthread_create(&th[i], 0, loop, 0);
    for (int i = 0; i < threads; i++) pthread_join(th[i], 0);
    return now() - t;
}

int main(void) {
    printf("fma: %.4f ns/op\n", timed(fma_loop, 1) / N * 1e9);
    printf("vpmaddwd: %.4f ns/op\n", timed(madd_loop, 1) / N * 1e9);
    printf("vpmaddwd+vpaddd: %.4f ns/madd\n", timed(madd_add_loop, 1) / (N / 2) * 1e9);
    printf("vpmaddubsw: %.4f ns/op\n", timed(maddubs_loop, 1) / N * 1e9);
    printf("fma on 2 threads: %.1f G multiply-adds/s in all\n", 2.0 * N * 8 / timed(fma_loop, 2) / 1e9);
    return 0;
}
