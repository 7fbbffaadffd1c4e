/* The inverted-file search of service/cell_index.py, cell-major, in two steps:
 *
 * 1. scan: every cell any query of the batch probes is read once, for all the queries that probe it (a batch of
 *    32 real inputs probes ~730 of 1,000 cells at 1M keys, each query 96 of them: read per query, the same codes
 *    would be read ~4 times). A cell's reduced codes are stored in blocks of 16 keys, one number of each key
 *    per lane ([blocks][rdim][16] float16), so 16 keys are scored against a query with rdim fused multiply-adds
 *    on whole vectors. Each query keeps its best `refine` candidates (a pool, below).
 * 2. refine: each candidate is re-scored exactly on its full key (float16 [size][dim], read in place), and the
 *    best k are returned, best first.
 *
 * Every phase is split over `threads` POSIX threads (the scan by cells, each thread with pools of its own merged
 * after; the rest by queries), with the GIL released. On x86-64 CPUs with AVX2, FMA and F16C (checked at run
 * time) the arithmetic uses them; elsewhere plain C. Every buffer is checked against the sizes before anything
 * is read (ValueError names the part).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define MAX_THREADS 64
#define MIN_WORK 4096 /* block-queries (16 keys x 1 query) a thread must have: ~0.1 ms */
#define MAX_RDIM 64 /* code numbers a key, at most: a block converted to float32 is 4 KB on the stack */

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X86_PATHS 1 /* AVX2/FMA/F16C functions, used where the CPU has them (checked at run time) */
#else
#define HAVE_X86_PATHS 0
#endif

#if HAVE_X86_PATHS
static int cpu_has_avx2_fma_f16c(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

__attribute__((target("avx2"))) static float sum8(__m256 v) {
    float lanes[8];
    _mm256_storeu_ps(lanes, v);
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}
#endif

static int64_t blocks_of(int64_t size) { return (size + LANES - 1) / LANES; }

/* ------------------------------------------------------------------------------------------ candidate pools */

/* A query's best `keep` candidates so far, in a pool of room 2 * keep: a candidate that beats `worst` is
 * appended; a full pool is cut back to its best `keep` by a quickselect, and `worst` rises to the worst of
 * those. Amortised O(1) a candidate (a heap costs log2(keep) moves each, and near-tie keys enter often). */
typedef struct {
    float *score;
    int64_t *loc; /* cell << 32 | slot */
    float *tmp_s; /* room for the cut's partitions */
    int64_t *tmp_l;
    int count, keep;
    float worst;
} Pool;

/* Moves the elements of [lo, hi) for which `score > pivot` (or, with `equal`, `score == pivot`) to the front,
 * the rest after them; returns how many went to the front. Free of branches on the data: a comparison decides
 * where an element is written, not which code runs (a branching quickselect mispredicts about every other
 * comparison; it took 15% of a batch's time). tmp_*: room for hi - lo. */
static int partition(float *score, int64_t *loc, int lo, int hi, float pivot, int equal, float *tmp_s,
                     int64_t *tmp_l) {
    int front = 0, back = hi - lo;
    for (int i = lo; i < hi; i++) {
        float x = score[i];
        int64_t l = loc[i];
        int ahead = equal ? x == pivot : x > pivot;
        tmp_s[front] = x, tmp_l[front] = l;
        tmp_s[back - 1] = x, tmp_l[back - 1] = l;
        front += ahead;
        back -= !ahead;
    }
    memcpy(score + lo, tmp_s, (hi - lo) * sizeof *score);
    memcpy(loc + lo, tmp_l, (hi - lo) * sizeof *loc);
    return front;
}

static float median3(float a, float b, float c) {
    float lo = a < b ? a : b, hi = a < b ? b : a;
    return c < lo ? lo : c > hi ? hi : c;
}

/* Puts the n best of score[0..count) first, in no order (n <= count; NaN never counts as best). */
static void select_best(float *score, int64_t *loc, int count, int n, float *tmp_s, int64_t *tmp_l) {
    int lo = 0, hi = count; /* [0, lo): among the best; [lo, hi): undecided; n - lo more wanted from it */
    while (lo < n && hi - lo > n - lo) {
        float pivot = median3(score[lo], score[lo + (hi - lo) / 2], score[hi - 1]);
        if (pivot != pivot) pivot = -INFINITY;
        int above = partition(score, loc, lo, hi, pivot, 0, tmp_s, tmp_l);
        if (above >= n - lo) { /* the best are all above the pivot */
            hi = lo + above;
            continue;
        }
        lo += above; /* all above it are in; then those equal to it, then the rest */
        int equal = partition(score, loc, lo, hi, pivot, 1, tmp_s, tmp_l);
        if (equal >= n - lo) return;
        lo += equal;
    }
}

/* Keeps the best `keep` (count >= keep) and raises the bar to the worst of them. */
static void pool_cut(Pool *pool) {
    select_best(pool->score, pool->loc, pool->count, pool->keep, pool->tmp_s, pool->tmp_l);
    pool->count = pool->keep;
    float worst = pool->score[0];
    for (int i = 1; i < pool->keep; i++) worst = pool->score[i] < worst ? pool->score[i] : worst;
    pool->worst = worst;
}

static void pool_push(Pool *pool, float score, int64_t loc) {
    if (pool->count == 2 * pool->keep) {
        pool_cut(pool);
        if (!(score > pool->worst)) return;
    }
    pool->score[pool->count] = score;
    pool->loc[pool->count] = loc;
    pool->count++;
}

/* ------------------------------------------------------------------------------------------ float16 */

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exponent = 127 - 15 + 1;
            while (!(mantissa & 0x400)) {
                mantissa <<= 1;
                exponent--;
            }
            bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
        }
    } else if (exponent == 31) {
        bits = sign | 0x7f800000 | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float dot_half_portable(const float *q, const uint16_t *key, int dim) {
    float s = 0.f;
    for (int e = 0; e < dim; e++) s += q[e] * half_to_float(key[e]);
    return s;
}

#if HAVE_X86_PATHS
__attribute__((target("avx2,fma,f16c"))) static float dot_half_f16c(const float *q, const uint16_t *key, int dim) {
    __m256 acc = _mm256_setzero_ps();
    int e = 0;
    for (; e + 8 <= dim; e += 8) {
        __m256 k = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(key + e)));
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + e), k, acc);
    }
    float s = sum8(acc);
    for (; e < dim; e++) s += q[e] * half_to_float(key[e]);
    return s;
}
#endif

/* ------------------------------------------------------------------------------------------ the cells */

static float dot_portable(const float *a, const float *b, int dim) {
    float s = 0.f;
    for (int e = 0; e < dim; e++) s += a[e] * b[e];
    return s;
}

#if HAVE_X86_PATHS
__attribute__((target("avx2,fma"))) static float dot_avx2(const float *a, const float *b, int dim) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    int e = 0;
    for (; e + 16 <= dim; e += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + e), _mm256_loadu_ps(b + e), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + e + 8), _mm256_loadu_ps(b + e + 8), acc1);
    }
    float s = sum8(_mm256_add_ps(acc0, acc1));
    for (; e < dim; e++) s += a[e] * b[e];
    return s;
}
#endif

/* ------------------------------------------------------------------------------------------ the scan */

typedef void (*scan_cell_fn)(const uint16_t *, int64_t, int, const float *, const int32_t *, int64_t, int64_t,
                             Pool *);

/* Scanning one cell: each probing query against each block of 16 keys; a key enters the query's pool when it
 * beats the worst one kept. `portable` is plain C (GCC vectorises it as it can); `avx2` keeps the 16 sums in
 * registers, as two halves of 8 with four partial sums each: a multiply-add waits 4 cycles for the one before
 * it on the same sum, and eight independent sums keep both FMA units busy. */

/* The lanes of a block's scores whose bit is set in `mask` (those that beat the query's bar) enter its pool;
 * visiting set bits only: a branch per lane would be mispredicted at random. The bar is checked again, since a
 * pool's cut can raise it between two lanes. */
static void enter_lanes(const float *got, unsigned mask, int64_t cell, int64_t block, Pool *pool) {
    for (; mask; mask &= mask - 1) {
        int j = __builtin_ctz(mask);
        if (got[j] > pool->worst) pool_push(pool, got[j], (cell << 32) | (block * LANES + j));
    }
}

static unsigned valid_lanes(int64_t valid) { return valid < LANES ? (1u << valid) - 1 : (1u << LANES) - 1; }

static void scan_cell_portable(const uint16_t *blocks, int64_t size, int rdim, const float *queries,
                               const int32_t *probers, int64_t m, int64_t cell, Pool *pools) {
    int64_t nblocks = blocks_of(size);
    for (int64_t b = 0; b < nblocks; b++) {
        const uint16_t *block = blocks + b * rdim * LANES;
        int64_t valid = size - b * LANES < LANES ? size - b * LANES : LANES;
        for (int64_t t = 0; t < m; t++) {
            const float *q = queries + (int64_t)probers[t] * rdim;
            float got[LANES] = {0};
            for (int e = 0; e < rdim; e++)
                for (int j = 0; j < LANES; j++) got[j] += q[e] * half_to_float(block[e * LANES + j]);
            Pool *pool = &pools[probers[t]];
            unsigned mask = 0;
            for (int j = 0; j < LANES; j++) mask |= (unsigned)(got[j] > pool->worst) << j;
            enter_lanes(got, mask & valid_lanes(valid), cell, b, pool);
        }
    }
}

#if HAVE_X86_PATHS
__attribute__((target("avx2,fma,f16c"))) static inline __m256 half8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* A block's 16 scores for one query (lanes 0-7 and 8-15), compared with its bar on whole vectors. */
__attribute__((target("avx2,fma,f16c"))) static inline void offer(__m256 lo, __m256 hi, int64_t valid, int64_t cell,
                                                                  int64_t block, Pool *pool) {
    __m256 worst = _mm256_set1_ps(pool->worst);
    unsigned mask = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(lo, worst, _CMP_GT_OQ)) |
                    (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(hi, worst, _CMP_GT_OQ)) << 8;
    mask &= valid_lanes(valid);
    if (!mask) return;
    float got[LANES];
    _mm256_storeu_ps(got, lo);
    _mm256_storeu_ps(got + 8, hi);
    enter_lanes(got, mask, cell, block, pool);
}

__attribute__((target("avx2,fma,f16c"))) static void scan_cell_avx2(const uint16_t *blocks, int64_t size, int rdim,
                                                                    const float *queries, const int32_t *probers,
                                                                    int64_t m, int64_t cell, Pool *pools) {
    float wide[MAX_RDIM * LANES] __attribute__((aligned(32)));
    int64_t nblocks = blocks_of(size);
    for (int64_t b = 0; b < nblocks; b++) {
        /* The block in float32 once (L1-resident), for all the queries that probe the cell. */
        const uint16_t *block = blocks + b * rdim * LANES;
        for (int e = 0; e < rdim * LANES; e += 8) _mm256_store_ps(wide + e, half8(block + e));
        int64_t valid = size - b * LANES < LANES ? size - b * LANES : LANES;
        int64_t t = 0;
        /* Two queries at a time: each row of the block is loaded once for both, and their eight sums are
         * independent chains of rdim / 2 multiply-adds, enough to keep both FMA units busy. */
        for (; t + 2 <= m; t += 2) {
            const float *q0 = queries + (int64_t)probers[t] * rdim, *q1 = queries + (int64_t)probers[t + 1] * rdim;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            int e = 0;
            for (; e + 2 <= rdim; e += 2) {
                const float *r = wide + e * LANES;
                __m256 r0 = _mm256_load_ps(r), r1 = _mm256_load_ps(r + 8);
                __m256 r2 = _mm256_load_ps(r + 16), r3 = _mm256_load_ps(r + 24);
                __m256 w = _mm256_broadcast_ss(q0 + e), x = _mm256_broadcast_ss(q0 + e + 1);
                a0 = _mm256_fmadd_ps(w, r0, a0);
                a1 = _mm256_fmadd_ps(w, r1, a1);
                a2 = _mm256_fmadd_ps(x, r2, a2);
                a3 = _mm256_fmadd_ps(x, r3, a3);
                w = _mm256_broadcast_ss(q1 + e), x = _mm256_broadcast_ss(q1 + e + 1);
                b0 = _mm256_fmadd_ps(w, r0, b0);
                b1 = _mm256_fmadd_ps(w, r1, b1);
                b2 = _mm256_fmadd_ps(x, r2, b2);
                b3 = _mm256_fmadd_ps(x, r3, b3);
            }
            for (; e < rdim; e++) {
                __m256 r0 = _mm256_load_ps(wide + e * LANES), r1 = _mm256_load_ps(wide + e * LANES + 8);
                a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(q0 + e), r0, a0);
                a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(q0 + e), r1, a1);
                b0 = _mm256_fmadd_ps(_mm256_broadcast_ss(q1 + e), r0, b0);
                b1 = _mm256_fmadd_ps(_mm256_broadcast_ss(q1 + e), r1, b1);
            }
            offer(_mm256_add_ps(a0, a2), _mm256_add_ps(a1, a3), valid, cell, b, &pools[probers[t]]);
            offer(_mm256_add_ps(b0, b2), _mm256_add_ps(b1, b3), valid, cell, b, &pools[probers[t + 1]]);
        }
        for (; t < m; t++) {
            const float *q = queries + (int64_t)probers[t] * rdim;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
            int e = 0;
            for (; e + 4 <= rdim; e += 4) {
                const float *r = wide + e * LANES;
                __m256 w0 = _mm256_broadcast_ss(q + e), w1 = _mm256_broadcast_ss(q + e + 1);
                __m256 w2 = _mm256_broadcast_ss(q + e + 2), w3 = _mm256_broadcast_ss(q + e + 3);
                a0 = _mm256_fmadd_ps(w0, _mm256_load_ps(r), a0);
                a1 = _mm256_fmadd_ps(w0, _mm256_load_ps(r + 8), a1);
                a2 = _mm256_fmadd_ps(w1, _mm256_load_ps(r + 16), a2);
                a3 = _mm256_fmadd_ps(w1, _mm256_load_ps(r + 24), a3);
                a4 = _mm256_fmadd_ps(w2, _mm256_load_ps(r + 32), a4);
                a5 = _mm256_fmadd_ps(w2, _mm256_load_ps(r + 40), a5);
                a6 = _mm256_fmadd_ps(w3, _mm256_load_ps(r + 48), a6);
                a7 = _mm256_fmadd_ps(w3, _mm256_load_ps(r + 56), a7);
            }
            for (; e < rdim; e++) {
                __m256 w = _mm256_broadcast_ss(q + e);
                a0 = _mm256_fmadd_ps(w, _mm256_load_ps(wide + e * LANES), a0);
                a1 = _mm256_fmadd_ps(w, _mm256_load_ps(wide + e * LANES + 8), a1);
            }
            offer(_mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a4, a6)),
                  _mm256_add_ps(_mm256_add_ps(a1, a3), _mm256_add_ps(a5, a7)), valid, cell, b, &pools[probers[t]]);
        }
    }
}
#endif

/* The arithmetic of a search: the AVX2/FMA/F16C versions where the CPU has them, else plain C (also when
 * PHA_CELLSCAN_PORTABLE=1, which is how the tests run the plain path on a CPU that has them). */
typedef struct {
    scan_cell_fn scan_cell;
    float (*dot)(const float *, const float *, int);
    float (*dot_half)(const float *, const uint16_t *, int);
} Kernels;

static Kernels pick_kernels(void) {
#if HAVE_X86_PATHS
    const char *portable = getenv("PHA_CELLSCAN_PORTABLE");
    if (!(portable && portable[0] == '1') && cpu_has_avx2_fma_f16c())
        return (Kernels){scan_cell_avx2, dot_avx2, dot_half_f16c};
#endif
    return (Kernels){scan_cell_portable, dot_portable, dot_half_portable};
}

/* ------------------------------------------------------------------------------------------ buffers */

typedef struct {
    Py_buffer *views;
    int64_t n;
} Views;

static void release_views(Views *v) {
    for (int64_t i = 0; i < v->n; i++)
        if (v->views[i].obj) PyBuffer_Release(&v->views[i]);
    PyMem_Free(v->views);
    v->views = NULL;
    v->n = 0;
}

/* One C-contiguous buffer of `itemsize`-byte items holding at least `need` items. */
static int get_view(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, Py_ssize_t need, int writable,
                    const char *what, int64_t cell) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (view->itemsize != itemsize || view->len / itemsize < need) {
        if (cell >= 0)
            PyErr_Format(PyExc_ValueError, "%s of cell %lld: %zd items of %zd bytes, need %zd of %zd", what,
                         (long long)cell, view->len / view->itemsize, view->itemsize, need, itemsize);
        else
            PyErr_Format(PyExc_ValueError, "%s: %zd items of %zd bytes, need %zd of %zd", what,
                         view->len / view->itemsize, view->itemsize, need, itemsize);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ search */

typedef struct {
    float score;
    int32_t pad;
    int64_t id;
} Hit;

static int cmp_hits(const void *a, const void *b) {
    const Hit *x = a, *y = b;
    if (x->score != y->score) return (x->score < y->score) - (x->score > y->score);
    return (x->id > y->id) - (x->id < y->id);
}

/* The search's threads: started together behind a gate (so that if one cannot be started, none has begun), then
 * in step with a barrier between phases (pthread_barrier_t is missing on macOS). */
typedef struct {
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    int parties, waiting, round, gate; /* gate: 0 closed, 1 go, -1 go home */
} Sync;

static void sync_wait(Sync *y) {
    pthread_mutex_lock(&y->mutex);
    int round = y->round;
    if (++y->waiting == y->parties) {
        y->waiting = 0;
        y->round++;
        pthread_cond_broadcast(&y->cond);
    } else {
        while (round == y->round) pthread_cond_wait(&y->cond, &y->mutex);
    }
    pthread_mutex_unlock(&y->mutex);
}

static int sync_gate(Sync *y) {
    pthread_mutex_lock(&y->mutex);
    while (!y->gate) pthread_cond_wait(&y->cond, &y->mutex);
    int go = y->gate > 0;
    pthread_mutex_unlock(&y->mutex);
    return go;
}

static void sync_open(Sync *y, int gate) {
    pthread_mutex_lock(&y->mutex);
    y->gate = gate;
    pthread_cond_broadcast(&y->cond);
    pthread_mutex_unlock(&y->mutex);
}

/* Everything one search reads and writes; each thread works on its own share of it in every phase. */
typedef struct {
    Kernels kernels;
    /* the index */
    const uint16_t **codes, **keys; /* per cell (set for the cells the batch probes) */
    const int64_t **ids, *sizes;
    int64_t nlist;
    const float *centroids, *projection;
    int dim, rdim, nprobe, refine, k;
    /* the batch */
    const float *queries;
    Py_ssize_t batch;
    float *reduced;  /* [B][rdim] */
    int64_t *cells;  /* [B][nprobe], each query's nearest cell first */
    /* the probed cells (the union), with the queries that probe each, nearest cells left out (CSR) */
    const int64_t *union_cells, *first;
    const int32_t *probers;
    int64_t *cut;    /* [parts + 1]: the union split into parts of about equal work */
    int parts;
    Pool *pools;     /* [parts][B] */
    Hit *hits;       /* [parts][refine] */
    float *scratch_s; /* [parts][2 * nlist] */
    int64_t *scratch_c;
    float *out_s;
    int64_t *out_i;
    Sync sync;
} Search;

typedef void (*step_fn)(Search *, int part);

typedef struct {
    Search *s;
    int part;
    const step_fn *steps;
    int n_steps;
} Worker;

static void own_queries(const Search *s, int part, Py_ssize_t *from, Py_ssize_t *to) {
    *from = s->batch * part / s->parts;
    *to = s->batch * (part + 1) / s->parts;
}

/* Phase 1, per query: its nprobe nearest cells (by inner product with the centroids, the nearest first) and its
 * reduced code (query @ projection). Here rather than in numpy: a BLAS call wakes OpenBLAS's threads, which then
 * spin on the other core while the scan runs (half the CPU time of a batch, measured with perf). */
static void prepare(Search *s, int part) {
    float *score = s->scratch_s + (int64_t)part * 2 * s->nlist;
    int64_t *cell = s->scratch_c + (int64_t)part * 2 * s->nlist;
    Py_ssize_t from, to;
    own_queries(s, part, &from, &to);
    for (Py_ssize_t q = from; q < to; q++) {
        const float *x = s->queries + q * s->dim;
        for (int64_t c = 0; c < s->nlist; c++) {
            score[c] = s->kernels.dot(x, s->centroids + c * s->dim, s->dim);
            cell[c] = c;
        }
        select_best(score, cell, (int)s->nlist, s->nprobe, score + s->nlist, cell + s->nlist);
        int best = 0;
        for (int p = 1; p < s->nprobe; p++) best = score[p] > score[best] ? p : best;
        int64_t nearest = cell[best];
        cell[best] = cell[0];
        cell[0] = nearest;
        memcpy(s->cells + q * s->nprobe, cell, s->nprobe * sizeof *cell);
        for (int r = 0; r < s->rdim; r++) {
            float v = 0.f;
            for (int e = 0; e < s->dim; e++) v += x[e] * s->projection[e * s->rdim + r];
            s->reduced[q * s->rdim + r] = v;
        }
    }
}

/* Phase 2, per query: its nearest cell alone, which sets the bar the other cells' keys must pass (in cell-number
 * order the bar would rise slowly and every near-tie key enter), shared with every part's pool. */
static void seed(Search *s, int part) {
    Py_ssize_t from, to;
    own_queries(s, part, &from, &to);
    for (Py_ssize_t q = from; q < to; q++) {
        int64_t c = s->cells[q * s->nprobe];
        int32_t one = (int32_t)q;
        s->kernels.scan_cell(s->codes[c], s->sizes[c], s->rdim, s->reduced, &one, 1, c, s->pools);
        if (s->pools[q].count < s->refine) continue;
        pool_cut(&s->pools[q]);
        for (int p = 1; p < s->parts; p++) s->pools[p * s->batch + q].worst = s->pools[q].worst;
    }
}

/* Phase 3, per part of the union: the scan, into the part's own pools. */
static void scan(Search *s, int part) {
    for (int64_t u = s->cut[part]; u < s->cut[part + 1]; u++) {
        int64_t c = s->union_cells[u];
        s->kernels.scan_cell(s->codes[c], s->sizes[c], s->rdim, s->reduced, s->probers + s->first[u],
                     s->first[u + 1] - s->first[u], c, s->pools + part * s->batch);
    }
}

/* Phase 4, per query: the parts' pools merged, the best `refine` re-scored on the float16 keys, the best k
 * written out, best first (ties: the lower id first). */
static void rescore(Search *s, int part) {
    Hit *hits = s->hits + (int64_t)part * s->refine;
    Py_ssize_t from, to;
    own_queries(s, part, &from, &to);
    for (Py_ssize_t q = from; q < to; q++) {
        Pool *pool = &s->pools[q];
        for (int p = 1; p < s->parts; p++) {
            const Pool *other = &s->pools[p * s->batch + q];
            for (int r = 0; r < other->count; r++)
                if (other->score[r] > pool->worst) pool_push(pool, other->score[r], other->loc[r]);
        }
        if (pool->count > s->refine)
            select_best(pool->score, pool->loc, pool->count, s->refine, pool->tmp_s, pool->tmp_l);
        int n = pool->count < s->refine ? pool->count : s->refine;
        for (int r = 0; r < n; r++) {
            int64_t cell = pool->loc[r] >> 32, slot = pool->loc[r] & 0xffffffff;
            hits[r] = (Hit){s->kernels.dot_half(s->queries + q * s->dim, s->keys[cell] + slot * s->dim, s->dim), 0,
                            s->ids[cell][slot]};
        }
        qsort(hits, n, sizeof *hits, cmp_hits);
        for (int r = 0; r < s->k; r++) {
            s->out_s[q * s->k + r] = r < n ? hits[r].score : -INFINITY;
            s->out_i[q * s->k + r] = r < n ? hits[r].id : -1;
        }
    }
}

static void *work(void *arg) {
    Worker *w = arg;
    if (w->part && !sync_gate(&w->s->sync)) return NULL;
    for (int i = 0; i < w->n_steps; i++) {
        if (i) sync_wait(&w->s->sync);
        w->steps[i](w->s, w->part);
    }
    return NULL;
}

/* Runs the steps on s->parts threads (this one included), in step. If a thread cannot be started, this one runs
 * every part's steps itself, in the same order. */
static void run_parts(Search *s, const step_fn *steps, int n_steps) {
    Worker workers[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started = 1;
    s->sync.parties = s->parts;
    s->sync.waiting = s->sync.round = s->sync.gate = 0;
    for (int p = 0; p < s->parts; p++) workers[p] = (Worker){s, p, steps, n_steps};
    for (; started < s->parts; started++)
        if (pthread_create(&tid[started], NULL, work, &workers[started]) != 0) break;
    if (started == s->parts) {
        sync_open(&s->sync, 1);
        work(&workers[0]);
    } else {
        sync_open(&s->sync, -1);
        for (int i = 0; i < n_steps; i++)
            for (int p = 0; p < s->parts; p++) steps[i](s, p);
    }
    for (int p = 1; p < started; p++) pthread_join(tid[p], NULL);
}

/* Python's entry: checks every buffer against the sizes it must have, then runs the phases with the GIL released
 * (but for the one step that takes the probed cells' buffers). */
static PyObject *search(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *codes_list, *ids_list, *keys_list, *sizes_obj, *centroids_obj, *projection_obj, *queries_obj,
        *out_s_obj, *out_i_obj;
    int rdim, dim, nprobe, refine, k, threads;
    if (!PyArg_ParseTuple(args, "O!O!O!OOOOOOiiiiii", &PyList_Type, &codes_list, &PyList_Type, &ids_list,
                          &PyList_Type, &keys_list, &sizes_obj, &centroids_obj, &projection_obj, &queries_obj,
                          &out_s_obj, &out_i_obj, &rdim, &dim, &nprobe, &refine, &k, &threads))
        return NULL;
    Py_ssize_t nlist = PyList_GET_SIZE(codes_list);
    if (rdim < 1 || rdim > MAX_RDIM || dim < 1 || nprobe < 1 || nprobe > nlist || k < 1 || refine < k ||
        refine > (1 << 28) || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "need 1 <= rdim <= 64, dim, k, threads >= 1, 1 <= nprobe <= cells and "
                                          "k <= refine <= 2**28");
        return NULL;
    }
    if (PyList_GET_SIZE(ids_list) != nlist || PyList_GET_SIZE(keys_list) != nlist || nlist >= INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "codes, ids and keys must hold one entry per cell each");
        return NULL;
    }
    Search s = {.kernels = pick_kernels(), .nlist = nlist,
                .dim = dim, .rdim = rdim, .nprobe = nprobe, .refine = refine, .k = k};
    pthread_mutex_init(&s.sync.mutex, NULL);
    pthread_cond_init(&s.sync.cond, NULL);
    Py_buffer sizes_v = {0}, centroids_v = {0}, projection_v = {0}, queries_v = {0}, out_s_v = {0}, out_i_v = {0};
    Views codes_v = {0}, ids_v = {0}, keys_v = {0};
    int64_t *count = NULL, *union_cells = NULL, *first = NULL, *cut = NULL, *pool_l = NULL;
    int32_t *probers = NULL;
    char *seeds = NULL;
    float *pool_s = NULL;
    PyObject *result = NULL;

    if (get_view(sizes_obj, &sizes_v, 8, nlist, 0, "sizes", -1) < 0) goto done;
    if (get_view(centroids_obj, &centroids_v, 4, nlist * dim, 0, "centroids", -1) < 0) goto done;
    if (get_view(projection_obj, &projection_v, 4, (Py_ssize_t)dim * rdim, 0, "projection", -1) < 0) goto done;
    if (get_view(queries_obj, &queries_v, 4, 0, 0, "queries", -1) < 0) goto done;
    Py_ssize_t batch = queries_v.len / 4 / dim;
    if (batch * dim * 4 != queries_v.len) {
        PyErr_Format(PyExc_ValueError, "queries: %zd floats is not a whole number of %d-dim rows",
                     queries_v.len / 4, dim);
        goto done;
    }
    if (get_view(out_s_obj, &out_s_v, 4, batch * k, 1, "out scores", -1) < 0) goto done;
    if (get_view(out_i_obj, &out_i_v, 8, batch * k, 1, "out ids", -1) < 0) goto done;
    const int64_t *sizes = sizes_v.buf;
    int64_t total = 0;
    for (Py_ssize_t c = 0; c < nlist; c++) {
        if (sizes[c] < 0 || sizes[c] >= ((int64_t)1 << 31)) {
            PyErr_Format(PyExc_ValueError, "cell %zd has size %lld", c, (long long)sizes[c]);
            goto done;
        }
        total += sizes[c];
    }
    /* Threads only where each gets MIN_WORK block-queries or more: starting one costs ~50 us. */
    double work = (double)batch * nprobe * ((double)total / nlist) / LANES;
    s.parts = work / MIN_WORK < threads ? (int)(work / MIN_WORK) : threads;
    s.parts = s.parts < 1 ? 1 : s.parts > MAX_THREADS ? MAX_THREADS : s.parts;
    s.batch = batch;
    s.queries = queries_v.buf;
    s.centroids = centroids_v.buf;
    s.projection = projection_v.buf;
    s.sizes = sizes;
    s.out_s = out_s_v.buf;
    s.out_i = out_i_v.buf;
    int64_t room = 2 * (int64_t)refine, n_pools = (int64_t)s.parts * batch;
    s.cells = PyMem_Malloc((batch * nprobe + 1) * sizeof *s.cells);
    s.reduced = PyMem_Malloc((batch * rdim + 1) * sizeof *s.reduced);
    s.scratch_s = PyMem_Malloc(2 * s.parts * nlist * sizeof *s.scratch_s);
    s.scratch_c = PyMem_Malloc(2 * s.parts * nlist * sizeof *s.scratch_c);
    s.hits = PyMem_Malloc(s.parts * (int64_t)refine * sizeof *s.hits);
    s.pools = PyMem_Malloc((n_pools + 1) * sizeof *s.pools);
    pool_s = PyMem_Malloc((2 * n_pools * room + 1) * sizeof *pool_s);
    pool_l = PyMem_Malloc((2 * n_pools * room + 1) * sizeof *pool_l);
    if (!s.cells || !s.reduced || !s.scratch_s || !s.scratch_c || !s.hits || !s.pools || !pool_s || !pool_l) {
        PyErr_NoMemory();
        goto done;
    }
    for (int64_t i = 0; i < n_pools; i++)
        s.pools[i] = (Pool){pool_s + 2 * i * room, pool_l + 2 * i * room, pool_s + (2 * i + 1) * room,
                            pool_l + (2 * i + 1) * room, 0, refine, -INFINITY};
    static const step_fn first_steps[] = {prepare};
    Py_BEGIN_ALLOW_THREADS
    run_parts(&s, first_steps, 1);
    Py_END_ALLOW_THREADS

    /* The union of the probed cells, and per cell the queries that probe it, each query's nearest cell left out
     * (the seed step scans it): a counting sort by cell. */
    count = PyMem_Calloc(nlist + 1, sizeof *count);
    seeds = PyMem_Calloc(nlist + 1, 1);
    if (!count || !seeds) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < batch * nprobe; i++) count[s.cells[i]]++;
    for (Py_ssize_t q = 0; q < batch; q++) seeds[s.cells[q * nprobe]] = 1;
    int64_t n_union = 0;
    for (Py_ssize_t c = 0; c < nlist; c++) n_union += count[c] > 0;
    for (Py_ssize_t q = 0; q < batch; q++) count[s.cells[q * nprobe]]--;
    union_cells = PyMem_Malloc((n_union + 1) * sizeof *union_cells);
    first = PyMem_Malloc((n_union + 1) * sizeof *first);
    probers = PyMem_Malloc((batch * nprobe + 1) * sizeof *probers);
    cut = PyMem_Malloc((s.parts + 1) * sizeof *cut);
    s.codes = PyMem_Calloc(nlist, sizeof *s.codes);
    s.ids = PyMem_Calloc(nlist, sizeof *s.ids);
    s.keys = PyMem_Calloc(nlist, sizeof *s.keys);
    codes_v.views = PyMem_Calloc(n_union + 1, sizeof(Py_buffer));
    ids_v.views = PyMem_Calloc(n_union + 1, sizeof(Py_buffer));
    keys_v.views = PyMem_Calloc(n_union + 1, sizeof(Py_buffer));
    if (!union_cells || !first || !probers || !cut || !s.codes || !s.ids || !s.keys || !codes_v.views ||
        !ids_v.views || !keys_v.views) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t u = 0, offset = 0;
    for (Py_ssize_t c = 0; c < nlist; c++) {
        if (!count[c] && !seeds[c]) continue;
        union_cells[u] = c;
        first[u] = offset;
        offset += count[c];
        count[c] = first[u]; /* now: where the next prober of c goes */
        u++;
    }
    first[n_union] = offset;
    for (Py_ssize_t q = 0; q < batch; q++)
        for (int p = 1; p < nprobe; p++) probers[count[s.cells[q * nprobe + p]]++] = (int32_t)q;
    s.union_cells = union_cells;
    s.first = first;
    s.probers = probers;
    s.cut = cut;

    /* Every probed cell's buffers, checked against its size. */
    for (int64_t i = 0; i < n_union; i++) {
        int64_t c = union_cells[i], size = sizes[c], blocks = blocks_of(size);
        if (get_view(PyList_GET_ITEM(codes_list, c), &codes_v.views[i], 2, blocks * LANES * rdim, 0, "codes", c) < 0)
            goto done;
        codes_v.n = i + 1;
        if (get_view(PyList_GET_ITEM(ids_list, c), &ids_v.views[i], 8, size, 0, "ids", c) < 0) goto done;
        ids_v.n = i + 1;
        if (get_view(PyList_GET_ITEM(keys_list, c), &keys_v.views[i], 2, size * dim, 0, "keys", c) < 0) goto done;
        keys_v.n = i + 1;
        s.codes[c] = codes_v.views[i].buf;
        s.ids[c] = ids_v.views[i].buf;
        s.keys[c] = keys_v.views[i].buf;
    }

    /* The union cut into parts of about equal work (key blocks x probing queries). */
    int64_t union_work = 0, done_work = 0;
    for (int64_t i = 0; i < n_union; i++) union_work += blocks_of(sizes[union_cells[i]]) * (first[i + 1] - first[i]);
    cut[0] = 0;
    for (int p = 0; p < s.parts; p++) {
        int64_t to = cut[p];
        while (to < n_union && (p == s.parts - 1 || done_work < union_work * (p + 1) / s.parts)) {
            done_work += blocks_of(sizes[union_cells[to]]) * (first[to + 1] - first[to]);
            to++;
        }
        cut[p + 1] = to;
    }
    static const step_fn last_steps[] = {seed, scan, rescore};
    Py_BEGIN_ALLOW_THREADS
    run_parts(&s, last_steps, 3);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);

done:
    release_views(&codes_v);
    release_views(&ids_v);
    release_views(&keys_v);
    Py_buffer *singles[] = {&sizes_v, &centroids_v, &projection_v, &queries_v, &out_s_v, &out_i_v};
    for (size_t i = 0; i < sizeof singles / sizeof *singles; i++)
        if (singles[i]->obj) PyBuffer_Release(singles[i]);
    void *owned[] = {count, seeds, union_cells, first, probers, cut, pool_s, pool_l, s.cells, s.reduced,
                     s.scratch_s, s.scratch_c, s.hits, s.pools, (void *)s.codes, (void *)s.ids, (void *)s.keys};
    for (size_t i = 0; i < sizeof owned / sizeof *owned; i++) PyMem_Free(owned[i]);
    pthread_mutex_destroy(&s.sync.mutex);
    pthread_cond_destroy(&s.sync.cond);
    return result;
}

static PyMethodDef methods[] = {
    {"search", search, METH_VARARGS,
     "search(codes, ids, keys, sizes, centroids, projection, queries, out_scores, out_ids, rdim, dim, nprobe, "
     "refine, k, threads): the best k keys of each query among its probed cells (see service/cell_index.py)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cellscan", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cellscan(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "LANES", LANES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
