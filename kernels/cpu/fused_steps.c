/* SPG's native CPU kernels (launched by spg_fast.kernels.cpu.launch): masked SGD and Adam(W) steps
 * in one pass over each parameter, and the soft mask itself (of gradients, or of the change a step
 * made) for torch's own optimizers.
 *
 * A step covers a list of contiguous tensors of one dtype. Per tensor the gradient is multiplied by
 * `unscale` (GradScaler's inverse scale, negated to maximize, which negates exactly). Its SPG keep
 * factor is the stored one of a shared tensor (spg_fast.storage: float32, float64, bfloat16 bits or
 * the uint8 E5M3 code, decoded here), or the scalar head scale where the factor pointer is NULL. In
 * gradient mode the gradient is multiplied by it before torch.optim's update; in update mode the
 * update runs on the unmasked gradient and the change it makes to the parameter, weight decay
 * included, is multiplied by it. The update runs in the tensor's own precision, as torch's fused CPU
 * optimizers compute. Options enter as values rather than branches where that is exact (weight
 * decay 0 adds 0, decay 1 multiplies by 1); the remaining per-tensor branches are loop-invariant,
 * so the compiler unswitches them and each loop vectorises. The concatenated element range of the
 * list is cut into one slice per OpenMP thread, so many small tensors and one large one are spread
 * alike. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

/* Below this many elements a step runs on one thread. Measured (2 cores, AdamW, torch's OpenMP team
 * warm): two threads were as fast as one at 4096 elements and faster from 16384 (17.5 vs 18.6-29 us,
 * 65536: 23 vs 30 us). */
#define SERIAL_BELOW 4096
/* Slices start on 64-byte boundaries of the concatenated element range. */
#define SLICE_ALIGN 16
/* The uint8 code c stands for the float32 whose bits are (c + U8_OFFSET) << U8_SHIFT; 0 for 0. */
#define U8_SHIFT 20
#define U8_OFFSET 761u

typedef struct {
  void **param, **grad, **factor, **buf1, **buf2, **buf3;
  float **step;         /* per tensor: Adam's float32 step count, read and advanced here */
  const int64_t *numel;
  const double *aux;    /* per tensor: SGD's first-step flag */
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

static inline float from_bits(uint32_t bits) {
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

/* The keep factor of element i of stored keep factors f, per storage format. */
#define KEEP_FLOAT(f, i) ((f)[i])
#define KEEP_BF16(f, i) from_bits((uint32_t)(f)[i] << 16)
#define KEEP_U8(f, i) ((f)[i] ? from_bits(((uint32_t)(f)[i] + U8_OFFSET) << U8_SHIFT) : 0.0f)

/* Calls PIECE(t, k, start, count, ARGS) for every piece of this thread's slice, tensor k from
 * element start. */
#define PARALLEL_PIECES(t, nthreads, PIECE, ...)                                                   \
  do {                                                                                            \
    const int64_t total = total_numel(t);                                                         \
    _Pragma("omp parallel num_threads(nthreads) if (total >= SERIAL_BELOW)") {                   \
      const int64_t id = omp_get_thread_num(), team = omp_get_num_threads();                     \
      const int64_t lo = id == 0 ? 0 : total * id / team / SLICE_ALIGN * SLICE_ALIGN;            \
      const int64_t hi =                                                                          \
          id + 1 == team ? total : total * (id + 1) / team / SLICE_ALIGN * SLICE_ALIGN;           \
      int64_t base = 0;                                                                           \
      for (int64_t k = 0; k < (t)->ntensors && base < hi; base += (t)->numel[k], k++) {          \
        const int64_t s = lo > base ? lo - base : 0;                                              \
        const int64_t e = hi - base < (t)->numel[k] ? hi - base : (t)->numel[k];                  \
        if (s < e) PIECE(t, k, s, e - s, __VA_ARGS__);                                            \
      }                                                                                           \
    }                                                                                             \
  } while (0)

/* Calls BODY(..., update, shared) with both flags as constants, so that each of the four calls is
 * compiled with its branches folded (too many loop-invariant branches in one loop exceed what the
 * compiler unswitches, and the loop is then not vectorised). */
#define SPECIALISED(BODY, update, shared, ...)                                                     \
  do {                                                                                            \
    if (update) {                                                                                 \
      if (shared) BODY(__VA_ARGS__, 1, 1); else BODY(__VA_ARGS__, 1, 0);                          \
    } else {                                                                                      \
      if (shared) BODY(__VA_ARGS__, 0, 1); else BODY(__VA_ARGS__, 0, 0);                          \
    }                                                                                             \
  } while (0)

/* adam_loop's tensor and scalar arguments as adam_piece has them. */
#define ADAM_ARGS(T, K)                                                                            \
  at(t->param[k], s, sizeof(T)), at(t->grad[k], s, sizeof(T)), at(t->factor[k], s, sizeof(K)),   \
      at(t->buf1[k], s, sizeof(T)), at(t->buf2[k], s, sizeof(T)), at(t->buf3[k], s, sizeof(T)),   \
      n, head, unscale, decay, lr_wd, wd, one_minus_b1, b2, one_minus_b2, eps, step_size,         \
      bias2_sqrt

/* The steps for parameters of type T whose stored keep factors are of type K, decoded by KEEP. */
#define DEFINE_STEPS(T, SUFFIX, SQRT, FMA, K, KEEP)                                                \
  static inline __attribute__((always_inline)) void sgd_loop_##SUFFIX(                           \
      T *restrict p, const T *restrict g, const K *restrict f, T *restrict b, int64_t n, T head,  \
      T unscale, T lr, T wd, T mom, T undamped, int nesterov, int first, const int update,        \
      const int shared) {                                                                         \
    for (int64_t i = 0; i < n; i++) {                                                             \
      /* Every array is read once, into a local, before anything is stored. */                   \
      const T keep = shared ? (T)KEEP(f, i) : head;                                               \
      const T pi = p[i];                                                                          \
      T gi = g[i] * unscale;                                                                      \
      gi = (update ? gi : gi * keep) + wd * pi;                                                   \
      if (b) {                                                                                    \
        const T bi = first ? gi : b[i] * mom + undamped * gi;                                     \
        b[i] = bi;                                                                                \
        gi = nesterov ? gi + mom * bi : bi;                                                       \
      }                                                                                           \
      /* fused, as torch's CPU kernel updates the parameter */                                    \
      p[i] = update ? FMA(-keep, lr * gi, pi) : FMA(-lr, gi, pi);                                 \
    }                                                                                             \
  }                                                                                               \
                                                                                                  \
  static void sgd_piece_##SUFFIX(const tensors_t *t, int64_t k, int64_t s, int64_t n, T head,     \
                                 T unscale, int update, T lr, T wd, T mom, T undamped,             \
                                 int nesterov) {                                                   \
    SPECIALISED(sgd_loop_##SUFFIX, update, t->factor[k] != 0, at(t->param[k], s, sizeof(T)),      \
                at(t->grad[k], s, sizeof(T)), at(t->factor[k], s, sizeof(K)),                     \
                at(t->buf1[k], s, sizeof(T)), n, head, unscale, lr, wd, mom, undamped, nesterov,  \
                t->aux[k] != 0);                                                                  \
  }                                                                                               \
                                                                                                  \
  void spg_sgd_step_##SUFFIX(tensors_t t, T head, T unscale, int update, T lr, T wd, T mom,       \
                             T undamped, int nesterov, int nthreads) {                            \
    PARALLEL_PIECES(&t, nthreads, sgd_piece_##SUFFIX, head, unscale, update, lr, wd, mom,         \
                    undamped, nesterov);                                                          \
  }                                                                                               \
                                                                                                  \
  static inline __attribute__((always_inline)) void adam_loop_##SUFFIX(                          \
      T *restrict p, const T *restrict g, const K *restrict f, T *restrict m, T *restrict v,      \
      T *restrict vmax, int64_t n, T head, T unscale, T decay, T lr_wd, T wd, T one_minus_b1,     \
      T b2, T one_minus_b2, T eps, T step_size, T bias2_sqrt, const int amsgrad,                  \
      const int lerp_small, const int update, const int shared) {                                 \
    for (int64_t i = 0; i < n; i++) {                                                             \
      /* Every array is read once, into a local, before anything is stored. */                   \
      const T keep = shared ? (T)KEEP(f, i) : head;                                               \
      const T pi = p[i], m0 = m[i];                                                               \
      T gi = g[i] * unscale;                                                                      \
      gi = (update ? gi : gi * keep) + wd * pi;                                                   \
      /* torch's lerp: exact at either end of the weight range (beta1 = 0 gives m = g). */        \
      const T mi = lerp_small ? m0 + one_minus_b1 * (gi - m0) : gi - (gi - m0) * (1 - one_minus_b1); \
      T vi = v[i] * b2 + one_minus_b2 * gi * gi;                                                  \
      m[i] = mi;                                                                                  \
      v[i] = vi;                                                                                  \
      if (amsgrad) {                                                                              \
        vi = vmax[i] > vi ? vmax[i] : vi;                                                         \
        vmax[i] = vi;                                                                             \
      }                                                                                           \
      const T step = step_size * (mi / (SQRT(vi) / bias2_sqrt + eps));                            \
      p[i] = update ? pi - keep * (step + lr_wd * pi) : pi * decay - step;                        \
    }                                                                                             \
  }                                                                                               \
                                                                                                  \
  static void adam_piece_##SUFFIX(const tensors_t *t, int64_t k, int64_t s, int64_t n, T head,    \
                                  T unscale, int update, T decay, T lr_wd, T wd, T one_minus_b1,  \
                                  T b2, T one_minus_b2, T eps, double lr, double b1, double b2_) { \
    /* Bias corrections from this step's count, in double as torch forms them. */                 \
    const double count = (double)*t->step[k] + 1;                                                \
    const T step_size = (T)(lr / (1 - pow(b1, count)));                                           \
    const T bias2_sqrt = (T)sqrt(1 - pow(b2_, count));                                            \
    /* amsgrad and the lerp's branch constant too: left to the compiler, they are if-converted    \
     * into both arms and a blend, which made the update mask's loop twice as slow. */            \
    const int shared = t->factor[k] != 0, amsgrad = t->buf3[k] != 0, small = one_minus_b1 < 0.5; \
    if (amsgrad) {                                                                                \
      if (small) SPECIALISED(adam_loop_##SUFFIX, update, shared, ADAM_ARGS(T, K), 1, 1);          \
      else SPECIALISED(adam_loop_##SUFFIX, update, shared, ADAM_ARGS(T, K), 1, 0);                \
    } else {                                                                                      \
      if (small) SPECIALISED(adam_loop_##SUFFIX, update, shared, ADAM_ARGS(T, K), 0, 1);          \
      else SPECIALISED(adam_loop_##SUFFIX, update, shared, ADAM_ARGS(T, K), 0, 0);                \
    }                                                                                             \
  }                                                                                               \
                                                                                                  \
  void spg_adam_step_##SUFFIX(tensors_t t, T head, T unscale, int update, T decay, T lr_wd, T wd, \
                              double lr, double b1, double b2, double eps, int nthreads) {        \
    PARALLEL_PIECES(&t, nthreads, adam_piece_##SUFFIX, head, unscale, update, decay, lr_wd, wd,   \
                    (T)(1 - b1), (T)b2, (T)(1 - b2), (T)eps, lr, b1, b2);                         \
    for (int64_t k = 0; k < t.ntensors; k++) *t.step[k] += 1; /* after every thread read it */   \
  }                                                                                               \
                                                                                                  \
  static inline __attribute__((always_inline)) void mask_loop_##SUFFIX(                          \
      T *restrict x, const T *restrict b, const K *restrict f, int64_t n, T head,                 \
      const int update, const int shared) {                                                       \
    for (int64_t i = 0; i < n; i++) {                                                             \
      const T keep = shared ? (T)KEEP(f, i) : head;                                               \
      x[i] = update ? b[i] + keep * (x[i] - b[i]) : x[i] * keep;                                  \
    }                                                                                             \
  }                                                                                               \
                                                                                                  \
  static void mask_piece_##SUFFIX(const tensors_t *t, int64_t k, int64_t s, int64_t n, T head,    \
                                  int update) {                                                   \
    SPECIALISED(mask_loop_##SUFFIX, update, t->factor[k] != 0, at(t->param[k], s, sizeof(T)),     \
                at(t->grad[k], s, sizeof(T)), at(t->factor[k], s, sizeof(K)), n, head);           \
  }                                                                                               \
                                                                                                  \
  /* x *= keep (update 0: x are gradients), or x = before + keep * (x - before) (update 1: x are   \
   * parameters a step changed, `grad` holds their values before it); heads by *head, read here    \
   * so that the caller never reads a tensor's value. */                                          \
  void spg_soft_mask_##SUFFIX(tensors_t t, const T *head, int update, int nthreads) {             \
    const T scale = *head;                                                                        \
    PARALLEL_PIECES(&t, nthreads, mask_piece_##SUFFIX, scale, update);                            \
  }

DEFINE_STEPS(float, f32_f32, sqrtf, fmaf, float, KEEP_FLOAT)
DEFINE_STEPS(float, f32_f64, sqrtf, fmaf, double, KEEP_FLOAT)
DEFINE_STEPS(float, f32_bf16, sqrtf, fmaf, uint16_t, KEEP_BF16)
DEFINE_STEPS(float, f32_u8, sqrtf, fmaf, uint8_t, KEEP_U8)
DEFINE_STEPS(double, f64_f32, sqrt, fma, float, KEEP_FLOAT)
DEFINE_STEPS(double, f64_f64, sqrt, fma, double, KEEP_FLOAT)
DEFINE_STEPS(double, f64_bf16, sqrt, fma, uint16_t, KEEP_BF16)
DEFINE_STEPS(double, f64_u8, sqrt, fma, uint8_t, KEEP_U8)
