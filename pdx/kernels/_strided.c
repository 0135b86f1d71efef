/* Native strided copy for pdx's CPU pack/unpack (pdx.kernels.native builds the tables).
 *
 * Why: vLLM's CPU pages keep K transposed ([head_size, block] per page), so with 16-token
 * blocks K moves in 32-byte runs. torch's copy of such views spends most of its time in
 * per-run iterator overhead; here each run is a fixed-size move the compiler inlines.
 *
 * Tables (little-endian int64, built and validated in Python):
 *   groups [G, 12]: cache_base, chunk_base, n0, n1, n2, cs0, cs1, cs2, ks0, ks1, ks2, first_span
 *                   (spans of group g are first_span[g] .. first_span[g+1], last group ends at S)
 *   spans  [S, 3]:  cache_off, chunk_off, run_bytes
 * For every group, every (i0, i1, i2) and every span s of the group, run_bytes[s] bytes move
 * between cache_base + i0*cs0 + i1*cs1 + i2*cs2 + cache_off[s] and
 * chunk_base + i0*ks0 + i1*ks1 + i2*ks2 + chunk_off[s] (pack: cache -> chunk).
 * Spans are the innermost loop: one (layer, head, dim) row of a chunk is written whole
 * before the next, which keeps the destination lines in cache.
 *
 * copy(groups, spans, pack, threads) splits the (group, i0) units over `threads` threads
 * (the caller's thread takes one share) and releases the GIL while copying.
 * SOURCE_HASH is the hash of this file when it was built (pdx.kernels.native refuses a
 * binary whose hash differs from the source next to it).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#ifndef PDX_SOURCE_HASH
#define PDX_SOURCE_HASH "unknown"
#endif

#define GROUP_FIELDS 12
#define SPAN_FIELDS 3

typedef struct {
    const int64_t *groups;
    const int64_t *spans;
    int64_t num_groups;
    int64_t num_spans;
    int pack;
    int64_t unit_lo; /* units are (group, i0), numbered group-major */
    int64_t unit_hi;
    const int64_t *unit_start; /* first unit of each group, num_groups + 1 entries */
} work_t;

static inline void move(char *dst, const char *src, int64_t n) {
    /* Constant sizes become inlined vector moves; the rest goes to memcpy. */
    switch (n) {
    case 32: memcpy(dst, src, 32); break;
    case 64: memcpy(dst, src, 64); break;
    case 16: memcpy(dst, src, 16); break;
    case 128: memcpy(dst, src, 128); break;
    case 256: memcpy(dst, src, 256); break;
    default: memcpy(dst, src, (size_t)n); break;
    }
}

static void run_units(const work_t *w) {
    int64_t g = 0;
    while (g < w->num_groups && w->unit_start[g + 1] <= w->unit_lo) g++;
    for (int64_t u = w->unit_lo; u < w->unit_hi; u++) {
        while (w->unit_start[g + 1] <= u) g++;
        const int64_t *gr = w->groups + g * GROUP_FIELDS;
        int64_t i0 = u - w->unit_start[g];
        int64_t s_lo = gr[11];
        int64_t s_hi = g + 1 < w->num_groups ? w->groups[(g + 1) * GROUP_FIELDS + 11] : w->num_spans;
        char *cache0 = (char *)(intptr_t)gr[0] + i0 * gr[5];
        char *chunk0 = (char *)(intptr_t)gr[1] + i0 * gr[8];
        for (int64_t i1 = 0; i1 < gr[3]; i1++) {
            for (int64_t i2 = 0; i2 < gr[4]; i2++) {
                char *cache = cache0 + i1 * gr[6] + i2 * gr[7];
                char *chunk = chunk0 + i1 * gr[9] + i2 * gr[10];
                const int64_t *sp = w->spans + s_lo * SPAN_FIELDS;
                if (w->pack) {
                    for (int64_t s = s_lo; s < s_hi; s++, sp += SPAN_FIELDS)
                        move(chunk + sp[1], cache + sp[0], sp[2]);
                } else {
                    for (int64_t s = s_lo; s < s_hi; s++, sp += SPAN_FIELDS)
                        move(cache + sp[0], chunk + sp[1], sp[2]);
                }
            }
        }
    }
}

static void *thread_main(void *arg) {
    run_units((const work_t *)arg);
    return NULL;
}

#define MAX_THREADS 64

static PyObject *py_copy(PyObject *self, PyObject *args) {
    Py_buffer gbuf, sbuf;
    int pack, threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*pi", &gbuf, &sbuf, &pack, &threads)) return NULL;
    PyObject *result = NULL;
    int64_t num_groups = gbuf.len / (Py_ssize_t)(GROUP_FIELDS * sizeof(int64_t));
    int64_t num_spans = sbuf.len / (Py_ssize_t)(SPAN_FIELDS * sizeof(int64_t));
    int64_t *unit_start = NULL;
    if (gbuf.len % (Py_ssize_t)(GROUP_FIELDS * sizeof(int64_t)) || sbuf.len % (Py_ssize_t)(SPAN_FIELDS * sizeof(int64_t))) {
        PyErr_SetString(PyExc_ValueError, "copy tables have a partial row");
        goto done;
    }
    const int64_t *groups = (const int64_t *)gbuf.buf;
    for (int64_t g = 0; g < num_groups; g++) {
        int64_t first = groups[g * GROUP_FIELDS + 11];
        int64_t end = g + 1 < num_groups ? groups[(g + 1) * GROUP_FIELDS + 11] : num_spans;
        if (first < 0 || end < first || end > num_spans || groups[g * GROUP_FIELDS + 2] < 0) {
            PyErr_SetString(PyExc_ValueError, "copy tables: bad span range or shape");
            goto done;
        }
    }
    unit_start = (int64_t *)PyMem_RawMalloc((size_t)(num_groups + 1) * sizeof(int64_t));
    if (!unit_start) {
        PyErr_NoMemory();
        goto done;
    }
    unit_start[0] = 0;
    for (int64_t g = 0; g < num_groups; g++) unit_start[g + 1] = unit_start[g] + groups[g * GROUP_FIELDS + 2];
    int64_t units = unit_start[num_groups];
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > units) threads = units > 0 ? (int)units : 1;
    work_t work[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++) {
        work[t] = (work_t){groups, (const int64_t *)sbuf.buf, num_groups, num_spans, pack,
                           units * t / threads, units * (t + 1) / threads, unit_start};
    }
    Py_BEGIN_ALLOW_THREADS
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&tids[t], NULL, thread_main, &work[t]) == 0;
    run_units(&work[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(tids[t], NULL);
        else
            run_units(&work[t]); /* no thread: do its share here */
    }
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyMem_RawFree(unit_start);
    PyBuffer_Release(&gbuf);
    PyBuffer_Release(&sbuf);
    return result;
}

static PyMethodDef methods[] = {
    {"copy", py_copy, METH_VARARGS, "copy(groups, spans, pack, threads): run a strided copy table"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_strided", NULL, -1, methods};

PyMODINIT_FUNC PyInit__strided(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddStringConstant(m, "SOURCE_HASH", PDX_SOURCE_HASH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
