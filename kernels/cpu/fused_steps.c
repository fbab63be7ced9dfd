/* Masked SGD and Adam(W) steps for CPU tensors in one pass over each parameter (launched by spg_fast/cpu/steps.py).
 *
 * A step covers a list of contiguous tensors of one dtype. Per tensor the gradient is multiplied by `unscale`
 * (GradScaler's inverse scale, negated to maximize, which negates exactly) and by its SPG mask factor
 * (the per-element keep factor 1 - A of a shared tensor, or the scalar head scale where the factor pointer is
 * NULL), and torch.optim's update runs in the tensor's own precision, as torch's fused CPU optimizers compute.
 * Options enter as values rather than branches where that is exact (weight decay 0 adds 0, decay 1 multiplies
 * by 1), so each loop keeps few branches and vectorises. The concatenated element range of the list is cut into
 * one slice per OpenMP thread, so many small tensors and one large one are spread alike. */
#include <math.h>
#include <omp.h>
#include <stdint.h>

/* Below this many elements a step runs on one thread. Measured (2 cores, AdamW, torch's OpenMP team warm): two
 * threads were as fast as one at 4096 elements and faster from 16384 (17.5 vs 18.6-29 us, 65536: 23 vs 30 us). */
#define SERIAL_BELOW 4096
/* Slices start on 64-byte boundaries of the concatenated element range. */
#define SLICE_ALIGN 16

typedef struct {
  void **param, **grad, **factor, **buf1, **buf2, **buf3;
  const int64_t *numel;
  const double *aux; /* per tensor: SGD's first-step flag, Adam's step count */
  int64_t ntensors;
} tensors_t;

static int64_t total_numel(const tensors_t *t) {
  int64_t total = 0;
  for (int64_t i = 0; i < t->ntensors; i++) total += t->numel[i];
  return total;
}

static void *at(void *base, int64_t offset, int64_t itemsize) {
  return base ? (char *)base + offset * itemsize : 0;
}

/* Calls PIECE(t, k, start, count, ARGS) for every piece of this thread's slice, tensor k from element start. */
#define PARALLEL_PIECES(t, nthreads, PIECE, ...)                                                                   \
  do {                                                                                                            \
    const int64_t total = total_numel(t);                                                                         \
    _Pragma("omp parallel num_threads(nthreads) if (total >= SERIAL_BELOW)") {                                   \
      const int64_t id = omp_get_thread_num(), team = omp_get_num_threads();                                     \
      const int64_t lo = id == 0 ? 0 : total * id / team / SLICE_ALIGN * SLICE_ALIGN;                            \
      const int64_t hi = id + 1 == team ? total : total * (id + 1) / team / SLICE_ALIGN * SLICE_ALIGN;           \
      int64_t base = 0;                                                                                           \
      for (int64_t k = 0; k < (t)->ntensors && base < hi; base += (t)->numel[k], k++) {                          \
        const int64_t s = lo > base ? lo - base : 0;                                                              \
        const int64_t e = hi - base < (t)->numel[k] ? hi - base : (t)->numel[k];                                  \
        if (s < e) PIECE(t, k, s, e - s, __VA_ARGS__);                                                            \
      }                                                                                                           \
    }                                                                                                             \
  } while (0)

#define DEFINE_STEPS(T, SUFFIX, SQRT, FMA)                                                                              \
  static void sgd_piece_##SUFFIX(const tensors_t *t, int64_t k, int64_t s, int64_t n, T head, T unscale, T lr,    \
                                 T wd, T mom, T undamped, int nesterov) {                                         \
    T *restrict p = at(t->param[k], s, sizeof(T));                                                                \
    const T *restrict g = at(t->grad[k], s, sizeof(T));                                                           \
    const T *restrict f = at(t->factor[k], s, sizeof(T));                                                         \
    T *restrict b = at(t->buf1[k], s, sizeof(T));                                                                 \
    const int first = t->aux[k] != 0;                                                                             \
    for (int64_t i = 0; i < n; i++) {                                                                             \
      T gi = g[i] * unscale;                                                                                      \
      gi = (f ? gi * f[i] : gi * head) + wd * p[i];                                                               \
      if (b) {                                                                                                    \
        const T bi = first ? gi : b[i] * mom + undamped * gi;                                                     \
        b[i] = bi;                                                                                                \
        gi = nesterov ? gi + mom * bi : bi;                                                                       \
      }                                                                                                           \
      p[i] = FMA(-lr, gi, p[i]); /* fused, as torch's CPU kernel updates the parameter */                        \
    }                                                                                                             \
  }                                                                                                               \
                                                                                                                  \
  void spg_sgd_step_##SUFFIX(tensors_t t, T head, T unscale, T lr, T wd, T mom, T undamped, int nesterov,        \
                             int nthreads) {                                                                      \
    PARALLEL_PIECES(&t, nthreads, sgd_piece_##SUFFIX, head, unscale, lr, wd, mom, undamped, nesterov);           \
  }                                                                                                               \
                                                                                                                  \
  static void adam_piece_##SUFFIX(const tensors_t *t, int64_t k, int64_t s, int64_t n, T head, T unscale,         \
                                  T decay, T wd, T one_minus_b1, T b2, T one_minus_b2, T eps, double lr,          \
                                  double b1, double b2_) {                                                        \
    T *restrict p = at(t->param[k], s, sizeof(T));                                                                \
    const T *restrict g = at(t->grad[k], s, sizeof(T));                                                           \
    const T *restrict f = at(t->factor[k], s, sizeof(T));                                                         \
    T *restrict m = at(t->buf1[k], s, sizeof(T));                                                                 \
    T *restrict v = at(t->buf2[k], s, sizeof(T));                                                                 \
    T *restrict vmax = at(t->buf3[k], s, sizeof(T));                                                              \
    /* Bias corrections from this tensor's step count, in double as torch forms them. */                          \
    const T step_size = (T)(lr / (1 - pow(b1, t->aux[k])));                                                       \
    const T bias2_sqrt = (T)sqrt(1 - pow(b2_, t->aux[k]));                                                        \
    const int lerp_small = one_minus_b1 < (T)0.5;                                                                 \
    for (int64_t i = 0; i < n; i++) {                                                                             \
      T gi = g[i] * unscale;                                                                                      \
      gi = f ? gi * f[i] : gi * head;                                                                             \
      const T pi = p[i] * decay;                                                                                  \
      gi = gi + wd * p[i];                                                                                        \
      /* torch's lerp: exact at either end of the weight range (beta1 = 0 gives m = g exactly). */                \
      const T mi = lerp_small ? m[i] + one_minus_b1 * (gi - m[i]) : gi - (gi - m[i]) * (1 - one_minus_b1);        \
      T vi = v[i] * b2 + one_minus_b2 * gi * gi;                                                                  \
      m[i] = mi;                                                                                                  \
      v[i] = vi;                                                                                                  \
      if (vmax) {                                                                                                 \
        vi = vmax[i] > vi ? vmax[i] : vi;                                                                         \
        vmax[i] = vi;                                                                                             \
      }                                                                                                           \
      p[i] = pi - step_size * (mi / (SQRT(vi) / bias2_sqrt + eps));                                               \
    }                                                                                                             \
  }                                                                                                               \
                                                                                                                  \
  void spg_adam_step_##SUFFIX(tensors_t t, T head, T unscale, T decay, T wd, double lr, double b1, double b2,    \
                              double eps, int nthreads) {                                                         \
    PARALLEL_PIECES(&t, nthreads, adam_piece_##SUFFIX, head, unscale, decay, wd, (T)(1 - b1), (T)b2,             \
                    (T)(1 - b2), (T)eps, lr, b1, b2);                                                             \
  }

DEFINE_STEPS(float, f32, sqrtf, fmaf)
DEFINE_STEPS(double, f64, sqrt, fma)
