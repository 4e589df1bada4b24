/* omp_helpers.h: the few OpenMP calls the kernels make, with one-thread
 * fallbacks so the build still works without OpenMP. */
#ifndef FASTRNN_OMP_HELPERS_H
#define FASTRNN_OMP_HELPERS_H
#ifdef _OPENMP
#include <omp.h>
static inline int fastrnn_thread_num(void) { return omp_get_thread_num(); }
static inline int fastrnn_team_size(void) { return omp_get_num_threads(); }
/* An orphaned barrier: binds to the parallel region the caller is in. */
static inline void fastrnn_barrier(void) {
#pragma omp barrier
}
#else
static inline int fastrnn_thread_num(void) { return 0; }
static inline int fastrnn_team_size(void) { return 1; }
static inline void fastrnn_barrier(void) {}
#endif
#endif
