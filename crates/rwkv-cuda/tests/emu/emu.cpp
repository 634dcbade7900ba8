// The kernels compiled for the host emulation (see emu.h). Build:
//   g++ -std=c++20 -O2 -fPIC -shared -fvisibility=hidden -DHEAD_SIZE=<N> emu.cpp -o libemu.so
// Hidden visibility matters: libraries for two head sizes are loaded at once, and exported
// inline globals (threadIdx, the fiber state) would otherwise be shared between them.
#include "emu.h"

#include "../../kernels/common.cuh"
#include "../../kernels/convert.cu"
#include "../../kernels/embed.cu"
#include "../../kernels/norm.cu"
#include "../../kernels/sampling.cu"
#include "../../kernels/token_mix.cu"
#include "../../kernels/wkv6.cu"

#define K(name, threads) {#name, emu_kernel(name, threads)}

static const std::map<std::string, EmuKernel>& registry() {
    // `true`: the kernel synchronises (barriers or shuffles), so its threads run concurrently.
    static const std::map<std::string, EmuKernel> r = {
        K(to_bf16_f32, false),
        K(to_f32_bf16, false),
        K(gemm_out_f32, false),
        K(gemm_out_bf16, false),
        K(kvrg_out_f32, false),
        K(embedding_bf16, false),
        K(layer_norm_f32, true),
        K(layer_norm_bf16, true),
        K(residual_layer_norm_f32, true),
        K(group_norm_gate_f32, true),
        K(softmax_f32, true),
        K(topk_f32, true),
        K(row_mass_f32, true),
        K(tmix_shift_f32, false),
        K(tmix_mix_f32, false),
        K(cmix_shift_f32, false),
        K(wkv6_decode_f32, true),
        K(wkv6_prefill_f32, true),
    };
    return r;
}

#define EMU_EXPORT __attribute__((visibility("default")))

extern "C" EMU_EXPORT int emu_launch(const char* name, unsigned gx, unsigned bx, void** args) {
    // One launch at a time: gridDim/blockDim and the `static` shared memory are process-wide,
    // and tests call in from several threads.
    static std::mutex lock;
    const std::lock_guard<std::mutex> guard(lock);
    const auto& r = registry();
    const auto it = r.find(name);
    if (it == r.end()) return 1;
    return emu_run(it->second, gx, bx, args);
}

extern "C" EMU_EXPORT int emu_head_size() { return HEAD_SIZE; }

extern "C" EMU_EXPORT int emu_has(const char* name) { return registry().count(name) ? 1 : 0; }
