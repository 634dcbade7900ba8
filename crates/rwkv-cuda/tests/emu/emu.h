// Host emulation of the CUDA subset the kernels use, so kernels/*.cu can be compiled as C++ and
// run on the CPU by tests/emu.rs (no GPU needed). Blocks run one after another. The threads of
// a block that synchronises (barriers, shuffles) run as fibers (ucontext coroutines) switched at
// every barrier, round-robin; the threads of purely element-wise kernels run one after another.
// __shared__ becomes `static`, shared by the threads of the one block that runs at a time.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <math.h>
#include <memory>
#include <mutex>
#include <string>
#include <ucontext.h>
#include <type_traits>
#include <utility>
#include <vector>

struct emu_dim3 {
    unsigned x = 1, y = 1, z = 1;
};
// One OS thread runs everything; the scheduler sets threadIdx before resuming each fiber.
inline emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

// A barrier among the fibers of a block (or of a warp).
struct EmuBarrier {
    unsigned n = 0, count = 0, gen = 0;
};

struct EmuBlock {
    EmuBarrier block;
    std::vector<EmuBarrier> warps;
    std::vector<uint32_t> shfl;
};
inline EmuBlock* emu_block = nullptr;

void emu_yield();

inline void emu_wait(EmuBarrier& b) {
    const unsigned g = b.gen;
    if (++b.count == b.n) {
        b.count = 0;
        b.gen++;
        return;
    }
    while (b.gen == g) emu_yield();
}

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

[[noreturn]] inline void emu_fail(const char* what) {
    std::fprintf(stderr, "emu: %s\n", what);
    std::abort();
}

inline void __syncthreads() {
    if (!emu_block) emu_fail("__syncthreads in a kernel registered as element-wise");
    emu_wait(emu_block->block);
}

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }

template <class T>
T __shfl_xor_sync(unsigned, T v, int o) {
    static_assert(sizeof(T) == 4, "4-byte shuffles only");
    if (!emu_block) emu_fail("__shfl_xor_sync in a kernel registered as element-wise");
    if (blockDim.x % 32 != 0) emu_fail("__shfl_xor_sync with a partial warp");
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint32_t* buf = &emu_block->shfl[warp * 32];
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    buf[lane] = bits;
    emu_wait(emu_block->warps[warp]);
    const uint32_t got = buf[lane ^ (unsigned)o];
    emu_wait(emu_block->warps[warp]);
    T r;
    std::memcpy(&r, &got, 4);
    return r;
}

// Calls a kernel with cuLaunchKernel-style arguments (an array of pointers to the values).
template <class... A, size_t... I>
void emu_call(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*reinterpret_cast<std::remove_cv_t<A>*>(args[I])...);
}

struct EmuKernel {
    std::function<void(void**)> call;
    bool threads;
};

template <class... A>
EmuKernel emu_kernel(void (*k)(A...), bool threads) {
    return {[k](void** args) { emu_call(k, args, std::index_sequence_for<A...>{}); }, threads};
}

// The fibers of one block: ucontext coroutines on the calling thread, switched at barriers.
struct EmuFibers {
    std::vector<ucontext_t> ctx;
    std::vector<std::vector<char>> stacks;
    std::vector<bool> done;
    ucontext_t main;
    unsigned current = 0;
    const std::function<void()>* body = nullptr;
};
inline EmuFibers emu_fibers;

inline void emu_yield() {
    EmuFibers& f = emu_fibers;
    swapcontext(&f.ctx[f.current], &f.main);
}

inline void emu_fiber_entry() {
    EmuFibers& f = emu_fibers;
    (*f.body)();
    f.done[f.current] = true; // returning resumes `main` through uc_link
}

inline void emu_run_block(unsigned bx, const std::function<void()>& body) {
    EmuFibers& f = emu_fibers;
    constexpr size_t STACK = 256 * 1024;
    f.ctx.resize(bx);
    f.done.assign(bx, false);
    while (f.stacks.size() < bx) f.stacks.emplace_back(STACK);
    f.body = &body;
    for (unsigned t = 0; t < bx; t++) {
        getcontext(&f.ctx[t]);
        f.ctx[t].uc_stack.ss_sp = f.stacks[t].data();
        f.ctx[t].uc_stack.ss_size = STACK;
        f.ctx[t].uc_link = &f.main;
        makecontext(&f.ctx[t], emu_fiber_entry, 0);
    }
    for (unsigned live = bx; live > 0;) {
        live = 0;
        for (unsigned t = 0; t < bx; t++) {
            if (f.done[t]) continue;
            f.current = t;
            threadIdx = {t, 1, 1};
            swapcontext(&f.main, &f.ctx[t]);
            live += f.done[t] ? 0 : 1;
        }
    }
}

inline int emu_run(const EmuKernel& k, unsigned gx, unsigned bx, void** args) {
    gridDim = {gx, 1, 1};
    blockDim = {bx, 1, 1};
    for (unsigned b = 0; b < gx; b++) {
        blockIdx = {b, 1, 1};
        if (!k.threads) {
            for (unsigned t = 0; t < bx; t++) {
                threadIdx = {t, 1, 1};
                k.call(args);
            }
            continue;
        }
        EmuBlock blk;
        blk.block.n = bx;
        for (unsigned w = 0; w < (bx + 31) / 32; w++) {
            EmuBarrier wb;
            wb.n = std::min(32u, bx - 32 * w);
            blk.warps.push_back(wb);
        }
        blk.shfl.assign(((bx + 31) / 32) * 32, 0);
        emu_block = &blk;
        const std::function<void()> body = [&] { k.call(args); };
        emu_run_block(bx, body);
        emu_block = nullptr;
    }
    return 0;
}
