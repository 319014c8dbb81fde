// A CUDA injection library (CUDA_INJECTION64_PATH) that writes the device's timeline of a run to
// a CSV file through CUPTI's activity API: every kernel, memset and copy with its start and end
// (nanoseconds, one clock) and stream, and with KTRACE_API=1 every driver call with the host
// thread's time in it. Nsight Systems is not on the GPU machine; this is what it would show.
//
//   KTRACE=out.csv          where the records go (default /tmp/ktrace.csv)
//   KTRACE_API=1            also the driver calls ("d" rows: callback id, see cupti_driver_cbid.h)
//   KTRACE_NOKERNEL=1       no kernel or memset records: tracing a graph's kernels slows its launch
//                           (about 110 us against 40-60 for a step of four layers), so host-side
//                           timings want them off
//
// Rows: kind (k kernel, s memset, c copy, d driver call), start, end, stream (thread for d), name.
// Built by build.sh; read by timeline.py.
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>

#define BUFFER_BYTES (8 << 20)

static FILE *out;

static void CUPTIAPI buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records) {
    *buffer = (uint8_t *)aligned_alloc(8, BUFFER_BYTES);
    *size = *buffer ? BUFFER_BYTES : 0;
    *max_records = 0;
}

static void row(char kind, uint64_t start, uint64_t end, uint32_t where, const char *name, int number) {
    if (name)
        fprintf(out, "%c,%llu,%llu,%u,%s\n", kind, (unsigned long long)start, (unsigned long long)end, where, name);
    else
        fprintf(out, "%c,%llu,%llu,%u,%d\n", kind, (unsigned long long)start, (unsigned long long)end, where, number);
}

// The records' leading fields (start, end, stream) sit where every version of these structs has
// them, so the newest struct of the headers built against reads what an older CUPTI writes.
static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size, size_t valid) {
    CUpti_Activity *r = NULL;
    while (cuptiActivityGetNextRecord(buffer, valid, &r) == CUPTI_SUCCESS) {
        switch (r->kind) {
        case CUPTI_ACTIVITY_KIND_KERNEL:
        case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
            const CUpti_ActivityKernel13 *k = (const CUpti_ActivityKernel13 *)r;
            row('k', k->start, k->end, k->streamId, k->name, 0);
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMSET: {
            const CUpti_ActivityMemset5 *m = (const CUpti_ActivityMemset5 *)r;
            row('s', m->start, m->end, m->streamId, "memset", 0);
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMCPY: {
            const CUpti_ActivityMemcpy7 *m = (const CUpti_ActivityMemcpy7 *)r;
            row('c', m->start, m->end, m->streamId, m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_HTOD   ? "copy_htod"
                                                    : m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOH ? "copy_dtoh"
                                                                                                     : "copy",
                0);
            break;
        }
        case CUPTI_ACTIVITY_KIND_DRIVER: {
            const CUpti_ActivityAPI *a = (const CUpti_ActivityAPI *)r;
            row('d', a->start, a->end, a->threadId, NULL, (int)a->cbid);
            break;
        }
        default:
            break;
        }
    }
    fflush(out);
    free(buffer);
}

static void finish(void) {
    cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
    if (out) fflush(out);
}

int InitializeInjection(void) {
    const char *path = getenv("KTRACE");
    out = fopen(path ? path : "/tmp/ktrace.csv", "w");
    if (!out) {
        perror("ktrace: opening the output");
        return 0;
    }
    if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS) {
        fprintf(stderr, "ktrace: CUPTI refused the activity callbacks\n");
        return 0;
    }
    if (!getenv("KTRACE_NOKERNEL")) {
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
    }
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
    if (getenv("KTRACE_API")) cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER);
    atexit(finish);
    return 1;
}
