/* isa.h: which instruction set the kernels run, chosen once, in one place.
 *
 * Every kernel that has ISA variants is written once and compiled three times
 * from the same source: for AVX-512 (x86-64-v4: F, BW, DQ, VL), for AVX2+FMA
 * (x86-64-v3) and for baseline x86-64, each with GCC's `target` attribute, so
 * no -march flag is needed and a wheel runs on any x86-64 machine. The
 * variant that runs is `fastrnn_isa_level()`: the best the CPU has unless
 * fastrnn._isa asked for a lower one (FASTRNN_ISA=avx2, fastrnn.set_isa).
 *
 * The level is a per-extension-module global (these headers are included by
 * each kernel module); fastrnn._isa sets it in every module at import and on
 * set_isa(). Switching while a kernel runs on another thread is not supported.
 */
#ifndef FASTRNN_ISA_H
#define FASTRNN_ISA_H

enum { FASTRNN_ISA_BASELINE = 0, FASTRNN_ISA_AVX2 = 1, FASTRNN_ISA_AVX512 = 2 };

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(FASTRNN_NO_DISPATCH)
#define FASTRNN_HAVE_DISPATCH 1
/* prefer-vector-width=512: let `omp simd` loops use zmm registers (GCC's
 * default tuning would stop at 256 bits). */
#define FASTRNN_TARGET_AVX512 \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi2,prefer-vector-width=512")))
#define FASTRNN_TARGET_AVX2 __attribute__((target("avx2,fma,bmi2")))
#else
#define FASTRNN_HAVE_DISPATCH 0
#define FASTRNN_TARGET_AVX512
#define FASTRNN_TARGET_AVX2
#endif

/* FASTRNN_SHUFFLE(MASK, a, b, i...): the lanes i... of a and b laid end to end, a
 * vector of as many lanes as indices. __builtin_shufflevector where the compiler
 * has it (clang, GCC >= 12), else GCC's __builtin_shuffle with the indices as a
 * MASK vector (integer lanes of the values' width): GCC 11, the compiler of
 * Ubuntu 22.04 and RHEL 9, has only the latter, clang only the former. */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define FASTRNN_SHUFFLE(MASK, a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#endif
#endif
#ifndef FASTRNN_SHUFFLE
#define FASTRNN_SHUFFLE(MASK, a, b, ...) __builtin_shuffle(a, b, (MASK){__VA_ARGS__})
#endif

/* Does this CPU (and OS: libgcc checks XCR0) support `level`? */
static inline int fastrnn_isa_supported(int level)
{
    if (level == FASTRNN_ISA_BASELINE)
        return 1;
#if FASTRNN_HAVE_DISPATCH
    __builtin_cpu_init();
    /* bmi2 too: the targets above let GCC emit shlx/sarx, which a CPU (or a VM's
     * CPU model) with AVX2 but without BMI2 would fault on (found by an audit) */
    if (level == FASTRNN_ISA_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
            && __builtin_cpu_supports("bmi2");
    if (level == FASTRNN_ISA_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")
            && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
            && __builtin_cpu_supports("bmi2");
#endif
    return 0;
}

static int fastrnn_isa_current = -1;   /* -1: not chosen yet */

static inline int fastrnn_isa_best(void)
{
    if (fastrnn_isa_supported(FASTRNN_ISA_AVX512)) return FASTRNN_ISA_AVX512;
    if (fastrnn_isa_supported(FASTRNN_ISA_AVX2)) return FASTRNN_ISA_AVX2;
    return FASTRNN_ISA_BASELINE;
}

/* The level the kernels run at (the best available until set). */
static inline int fastrnn_isa_level(void)
{
    int level = fastrnn_isa_current;
    if (level < 0) {
        level = fastrnn_isa_best();
        fastrnn_isa_current = level;
    }
    return level;
}

/* Run at `level` from now on: 0, or -1 if the CPU lacks it (nothing changes). */
static inline int fastrnn_isa_set(int level)
{
    if (level < FASTRNN_ISA_BASELINE || level > FASTRNN_ISA_AVX512 || !fastrnn_isa_supported(level))
        return -1;
    fastrnn_isa_current = level;
    return 0;
}

/* FASTRNN_MULTIVERSION(NAME, (params), (args), { body }) defines
 * NAME_avx512, NAME_avx2 and NAME_baseline from one body, and `NAME` itself,
 * which calls the one for fastrnn_isa_level(). For elementwise passes: the
 * body's `omp simd` loops are vectorised 16, 8 or 4 floats wide. */
#if FASTRNN_HAVE_DISPATCH
#define FASTRNN_MULTIVERSION(NAME, PARAMS, ARGS, ...)                               \
    FASTRNN_TARGET_AVX512 static void NAME##_avx512 PARAMS __VA_ARGS__              \
    FASTRNN_TARGET_AVX2 static void NAME##_avx2 PARAMS __VA_ARGS__                  \
    static void NAME##_baseline PARAMS __VA_ARGS__                                  \
    static inline void NAME PARAMS                                                  \
    {                                                                               \
        switch (fastrnn_isa_level()) {                                              \
        case FASTRNN_ISA_AVX512: NAME##_avx512 ARGS; break;                         \
        case FASTRNN_ISA_AVX2: NAME##_avx2 ARGS; break;                             \
        default: NAME##_baseline ARGS; break;                                       \
        }                                                                           \
    }
#else
#define FASTRNN_MULTIVERSION(NAME, PARAMS, ARGS, ...) static void NAME PARAMS __VA_ARGS__
#endif

#endif
