/* Row ranges split across PyTorch's own OpenMP team.
 *
 * Why not threads of our own: after each op PyTorch's OpenMP workers keep spinning for a few
 * milliseconds, so a thread of ours competes with a spinning worker for the same core (measured:
 * an mHC mix right after a GEMM ran at half speed). Handing the rows to that team, through
 * GOMP_parallel (the entry GCC-compiled OpenMP code calls; the Python side finds PyTorch's copy in
 * the process and passes it in), uses the threads that are already awake.
 * Without a team (the symbols were not found, or this is a forked child: an OpenMP team does not
 * survive fork) the rows run on the calling thread.
 */
#include <pthread.h>

#include "common.h"

typedef void (*gomp_parallel_t)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_int_t)(void);

static gomp_parallel_t gomp_parallel;
static omp_int_t omp_thread_num, omp_num_threads;

static void drop_team(void) { gomp_parallel = 0; }

/* the team's entry points, or NULLs: then every range runs on the caller's thread */
int v4c_use_openmp(void *parallel, void *thread_num, void *num_threads) {
    static int registered;
    if (!registered && pthread_atfork(0, 0, drop_team) == 0) registered = 1;
    if (!registered || !parallel || !thread_num || !num_threads) {
        gomp_parallel = 0;
        return -1;
    }
    omp_thread_num = (omp_int_t)thread_num;
    omp_num_threads = (omp_int_t)num_threads;
    gomp_parallel = (gomp_parallel_t)parallel;
    return 0;
}

struct job {
    v4c_rows_fn fn;
    void *ctx;
    long rows;
};

static void share(void *p) {
    const struct job *j = (const struct job *)p;
    const long t = omp_thread_num(), k = omp_num_threads(); /* the team may be smaller than asked */
    const long a = j->rows * t / k, e = j->rows * (t + 1) / k;
    if (a < e) j->fn(j->ctx, a, e, (int)t);
}

void v4c_parallel_rows(long rows, int threads, long grain, v4c_rows_fn fn, void *ctx) {
    long k = grain > 0 ? rows / grain : rows;
    if (k > threads) k = threads;
    if (k <= 1 || !gomp_parallel) {
        if (rows > 0) fn(ctx, 0, rows, 0);
        return;
    }
    struct job j = {fn, ctx, rows};
    gomp_parallel(share, &j, (unsigned)k, 0);
}
