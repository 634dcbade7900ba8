// Multiply-add throughput of this CPU's AVX2 instructions, to bound batched CPU decode
// (benches/README.md, "Against the targets"): 12 independent accumulators per loop, so each
// number is issue throughput, not latency.
//   gcc -O2 benches/isa-throughput.c -o /tmp/isa -lpthread && /tmp/isa
// The last line runs the FMA loop on two threads at once: the two cores' combined peak.
// vfmadd231ps: 8 f32 multiply-adds; vpmaddwd: 16 i16 x i16 products summed in pairs into 8 i32
// (vpaddd then accumulates them); vpmaddubsw: 32 u8 x i8 products summed in pairs into 16
// saturating i16.
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
#include <pthread.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define N 240000000L
static void* fma_loop(void* arg) {
    (void)arg;
    for (long i = 0; i < N / 12; i++) {
        __asm__ volatile(
            "vfmadd231ps %%ymm14,%%ymm15,%%ymm0\n vfmadd231ps %%ymm14,%%ymm15,%%ymm1\n vfmadd231ps %%ymm14,%%ymm15,%%ymm2\n"
            "vfmadd231ps %%ymm14,%%ymm15,%%ymm3\n vfmadd231ps %%ymm14,%%ymm15,%%ymm4\n vfmadd231ps %%ymm14,%%ymm15,%%ymm5\n"
            "vfmadd231ps %%ymm14,%%ymm15,%%ymm6\n vfmadd231ps %%ymm14,%%ymm15,%%ymm7\n vfmadd231ps %%ymm14,%%ymm15,%%ymm8\n"
            "vfmadd231ps %%ymm14,%%ymm15,%%ymm9\n vfmadd231ps %%ymm14,%%ymm15,%%ymm10\n vfmadd231ps %%ymm14,%%ymm15,%%ymm11\n"
            :::"ymm0","ymm1","ymm2","ymm3","ymm4","ymm5","ymm6","ymm7","ymm8","ymm9","ymm10","ymm11");
    }
    return 0;
}

int main(){
  double t,f;
  // FMA: 12 independent accumulators
  __asm__ volatile("vxorps %%ymm0,%%ymm0,%%ymm0":::"ymm0");
  t=now();
  for(long i=0;i<N/12;i++){
    __asm__ volatile(
      "vfmadd231ps %%ymm14,%%ymm15,%%ymm0\n vfmadd231ps %%ymm14,%%ymm15,%%ymm1\n vfmadd231ps %%ymm14,%%ymm15,%%ymm2\n"
      "vfmadd231ps %%ymm14,%%ymm15,%%ymm3\n vfmadd231ps %%ymm14,%%ymm15,%%ymm4\n vfmadd231ps %%ymm14,%%ymm15,%%ymm5\n"
      "vfmadd231ps %%ymm14,%%ymm15,%%ymm6\n vfmadd231ps %%ymm14,%%ymm15,%%ymm7\n vfmadd231ps %%ymm14,%%ymm15,%%ymm8\n"
      "vfmadd231ps %%ymm14,%%ymm15,%%ymm9\n vfmadd231ps %%ymm14,%%ymm15,%%ymm10\n vfmadd231ps %%ymm14,%%ymm15,%%ymm11\n"
      :::"ymm0","ymm1","ymm2","ymm3","ymm4","ymm5","ymm6","ymm7","ymm8","ymm9","ymm10","ymm11");
  }
  f=now()-t; printf("fma: %.4f ns/op\n", f/N*1e9);
  t=now();
  for(long i=0;i<N/12;i++){
    __asm__ volatile(
      "vpmaddwd %%ymm14,%%ymm15,%%ymm0\n vpmaddwd %%ymm14,%%ymm15,%%ymm1\n vpmaddwd %%ymm14,%%ymm15,%%ymm2\n"
      "vpmaddwd %%ymm14,%%ymm15,%%ymm3\n vpmaddwd %%ymm14,%%ymm15,%%ymm4\n vpmaddwd %%ymm14,%%ymm15,%%ymm5\n"
      "vpmaddwd %%ymm14,%%ymm15,%%ymm6\n vpmaddwd %%ymm14,%%ymm15,%%ymm7\n vpmaddwd %%ymm14,%%ymm15,%%ymm8\n"
      "vpmaddwd %%ymm14,%%ymm15,%%ymm9\n vpmaddwd %%ymm14,%%ymm15,%%ymm10\n vpmaddwd %%ymm14,%%ymm15,%%ymm11\n"
      :::"ymm0","ymm1","ymm2","ymm3","ymm4","ymm5","ymm6","ymm7","ymm8","ymm9","ymm10","ymm11");
  }
  f=now()-t; printf("vpmaddwd: %.4f ns/op\n", f/N*1e9);
  t=now();
  for(long i=0;i<N/12;i++){
    __asm__ volatile(
      "vpmaddwd %%ymm14,%%ymm15,%%ymm0\n vpaddd %%ymm0,%%ymm1,%%ymm1\n vpmaddwd %%ymm14,%%ymm15,%%ymm2\n vpaddd %%ymm2,%%ymm3,%%ymm3\n"
      "vpmaddwd %%ymm14,%%ymm15,%%ymm4\n vpaddd %%ymm4,%%ymm5,%%ymm5\n vpmaddwd %%ymm14,%%ymm15,%%ymm6\n vpaddd %%ymm6,%%ymm7,%%ymm7\n"
      "vpmaddwd %%ymm14,%%ymm15,%%ymm8\n vpaddd %%ymm8,%%ymm9,%%ymm9\n vpmaddwd %%ymm14,%%ymm15,%%ymm10\n vpaddd %%ymm10,%%ymm11,%%ymm11\n"
      :::"ymm0","ymm1","ymm2","ymm3","ymm4","ymm5","ymm6","ymm7","ymm8","ymm9","ymm10","ymm11");
  }
  f=now()-t; printf("vpmaddwd+vpaddd: %.4f ns/madd\n", f/(N/2)*1e9);
  t=now();
  for(long i=0;i<N/12;i++){
    __asm__ volatile(
      "vpmaddubsw %%ymm14,%%ymm15,%%ymm0\n vpmaddubsw %%ymm14,%%ymm15,%%ymm1\n vpmaddubsw %%ymm14,%%ymm15,%%ymm2\n"
      "vpmaddubsw %%ymm14,%%ymm15,%%ymm3\n vpmaddubsw %%ymm14,%%ymm15,%%ymm4\n vpmaddubsw %%ymm14,%%ymm15,%%ymm5\n"
      "vpmaddubsw %%ymm14,%%ymm15,%%ymm6\n vpmaddubsw %%ymm14,%%ymm15,%%ymm7\n vpmaddubsw %%ymm14,%%ymm15,%%ymm8\n"
      "vpmaddubsw %%ymm14,%%ymm15,%%ymm9\n vpmaddubsw %%ymm14,%%ymm15,%%ymm10\n vpmaddubsw %%ymm14,%%ymm15,%%ymm11\n"
      :::"ymm0","ymm1","ymm2","ymm3","ymm4","ymm5","ymm6","ymm7","ymm8","ymm9","ymm10","ymm11");
  }
  f=now()-t; printf("vpmaddubsw: %.4f ns/op\n", f/N*1e9);
  {
    pthread_t th[2];
    t=now();
    for (int i = 0; i < 2; i++) pthread_create(&th[i], 0, fma_loop, 0);
    for (int i = 0; i < 2; i++) pthread_join(th[i], 0);
    f=now()-t; printf("fma on 2 threads: %.1f G multiply-adds/s in all\n", 2.0 * N * 8 / f / 1e9);
  }
}
