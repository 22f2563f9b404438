/*
 * A stand-in libcuda.so.1 for vmmpool's tests: the CUDA driver calls vmmpool
 * uses, implemented on host memory, so that the real cuda.bindings (its
 * loader, argument conversion, return unwrapping and error names) can be
 * exercised on a machine without a GPU.
 *
 * Memory model
 *   reservation  = an anonymous PROT_NONE mmap (cuMemAddressReserve)
 *   allocation   = a memfd of the requested size (cuMemCreate)
 *   mapping      = mmap(MAP_SHARED | MAP_FIXED) of the memfd into a reservation
 *   access       = mprotect to the union of what the devices were granted;
 *                  copies check the current context's device's own grant.
 *
 * Rules follow the Driver API documentation. Where it leaves a case open,
 * the stand-in does what a real driver is reported to do, and a few of those
 * choices are switchable by environment (read at cuInit):
 *   STANDIN_CUDA_DEVICES=N        number of devices (default 2; 0: cuInit fails
 *                                 with CUDA_ERROR_NO_DEVICE, as without a GPU)
 *   STANDIN_CUDA_TOTAL_MEM=BYTES  memory per device (default 256 MiB)
 *   STANDIN_CUDA_MAP_OFFSET=accept|reject
 *                                 cuMemMap with a non-zero offset (the docs say
 *                                 both "a multiple of the granularity" and
 *                                 "currently must be zero"); default accept
 *   STANDIN_CUDA_HINT=honour|refuse
 *                                 a hinted cuMemAddressReserve (some drivers
 *                                 fail it outright); default honour when free
 *   STANDIN_CUDA_POSIX_FD=yes|refuse|no
 *                                 yes: supported; refuse: the attribute says 1
 *                                 but cuMemCreate refuses the handle type with
 *                                 CUDA_ERROR_NOT_PERMITTED (as in some
 *                                 containers); no: attribute 0 and
 *                                 CUDA_ERROR_NOT_SUPPORTED
 *   STANDIN_CUDA_ABSENT_DEVICE=invalid_device|invalid_value
 *                                 what cuMemSetAccess answers for a location id
 *                                 that is no device (the docs allow both);
 *                                 default CUDA_ERROR_INVALID_DEVICE
 *   STANDIN_CUDA_RDMA=0|1         CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_
 *                                 CUDA_VMM_SUPPORTED (default 0)
 *   STANDIN_CUDA_FAIL=fn:k:code[,fn:k:code...]
 *                                 the k-th call (1-based) of fn (base name,
 *                                 e.g. cuMemCreate) returns CUresult code
 *
 * Control functions (call through ctypes.CDLL("libcuda.so.1")):
 *   int  standin_fail(const char *fn, int k, int code)  k-th call from now fails
 *   void standin_clear_faults(void)
 *   long standin_calls(const char *fn)                  calls so far
 *   void standin_live(long out[5])   reservations, allocations, mappings,
 *                                    physical bytes, primary context refs
 *   int  standin_handle_flags(unsigned long long h)     bit 0: POSIX fd type,
 *                                    bit 1: gpuDirectRDMACapable (-1: unknown)
 *   long standin_live_host(void)     live cuMemHostAlloc blocks
 *
 * Written for the vmmpool tests; not a general CUDA emulator.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;

enum {
    SUCCESS = 0,
    E_INVALID_VALUE = 1,
    E_OUT_OF_MEMORY = 2,
    E_NOT_INITIALIZED = 3,
    E_NO_DEVICE = 100,
    E_INVALID_DEVICE = 101,
    E_INVALID_CONTEXT = 201,
    E_OPERATING_SYSTEM = 304,
    E_INVALID_HANDLE = 400,
    E_NOT_FOUND = 500,
    E_NOT_PERMITTED = 800,
    E_NOT_SUPPORTED = 801,
};

/* ABI structs of cuda.h (12.x and 13.x) */
typedef struct {
    int type; /* CUmemLocationType: 1 = device */
    int id;
} CUmemLocation;

typedef struct {
    int type;                 /* CUmemAllocationType: 1 = pinned */
    int requestedHandleTypes; /* bit mask: 1 = POSIX fd, 8 = fabric */
    CUmemLocation location;
    void *win32HandleMetaData;
    struct {
        unsigned char compressionType;
        unsigned char gpuDirectRDMACapable;
        unsigned short usage;
        unsigned char reserved[4];
    } allocFlags;
} CUmemAllocationProp;

typedef struct {
    CUmemLocation location;
    int flags; /* 0 none, 1 read, 3 read-write */
} CUmemAccessDesc;

#define GRANULARITY ((size_t)2 << 20)
#define MAX_DEVICES 8
#define CTX_MAGIC 0x43545821u
#define EVENT_MAGIC 0x45564e54u
#define STREAM_MAGIC 0x5354524du
#define ALLOC_MAGIC 0x414c4f43u

/* ------------------------------------------------------------------ state */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int initialized;
static int n_devices = 2;
static size_t total_mem = (size_t)256 << 20;
static int map_offset_accept = 1;
static int hint_refuse;
static int posix_fd_mode = 1; /* 1 yes, 2 refuse, 0 no */
static int rdma_supported;
static int absent_device_error = 101; /* CUDA_ERROR_INVALID_DEVICE */

typedef struct Ctx {
    unsigned magic;
    int device;
    int refs;
} Ctx;
static Ctx primary[MAX_DEVICES];
static size_t used_mem[MAX_DEVICES];

#define STACK_DEPTH 32
static __thread Ctx *ctx_stack[STACK_DEPTH];
static __thread int ctx_depth;

typedef struct Alloc {
    unsigned magic;
    int fd;
    size_t size;
    int device;
    int refs;
    int mappings;
    int posix_fd;
    int rdma;
    int imported;
    struct Alloc *next;
} Alloc;
static Alloc *allocs;

typedef struct Res {
    uintptr_t base;
    size_t size;
    struct Res *next;
} Res;
static Res *reservations;

typedef struct Map {
    uintptr_t addr;
    size_t size;
    Alloc *alloc;
    int access[MAX_DEVICES];
    struct Map *next;
} Map;
static Map *mappings;

typedef struct {
    unsigned magic;
    int device;
} Handle;

static long live_res, live_alloc, live_map;
static size_t live_bytes;

/* ------------------------------------------------- call counts and faults */
#define MAX_FN 64
static struct {
    char name[48];
    long calls;
    long fail_at[8];
    int fail_code[8];
} fns[MAX_FN];
static int n_fns;

static int fn_index(const char *name) {
    for (int i = 0; i < n_fns; i++)
        if (strcmp(fns[i].name, name) == 0) return i;
    if (n_fns == MAX_FN) return -1;
    snprintf(fns[n_fns].name, sizeof fns[n_fns].name, "%s", name);
    return n_fns++;
}

/* Count a call of `name`; return the injected failure code or 0. Lock held. */
static int count_call(const char *name) {
    int i = fn_index(name);
    if (i < 0) return 0;
    long n = ++fns[i].calls;
    for (int j = 0; j < 8; j++) {
        if (fns[i].fail_at[j] == n) {
            fns[i].fail_at[j] = 0;
            return fns[i].fail_code[j];
        }
    }
    return 0;
}

static int add_fault(const char *name, long k, int code) {
    int i = fn_index(name);
    if (i < 0 || k < 1) return -1;
    for (int j = 0; j < 8; j++) {
        if (fns[i].fail_at[j] == 0) {
            fns[i].fail_at[j] = fns[i].calls + k;
            fns[i].fail_code[j] = code;
            return 0;
        }
    }
    return -1;
}

EXPORT int standin_fail(const char *name, int k, int code) {
    pthread_mutex_lock(&lock);
    int r = add_fault(name, k, code);
    pthread_mutex_unlock(&lock);
    return r;
}

EXPORT void standin_clear_faults(void) {
    pthread_mutex_lock(&lock);
    for (int i = 0; i < n_fns; i++) memset(fns[i].fail_at, 0, sizeof fns[i].fail_at);
    pthread_mutex_unlock(&lock);
}

EXPORT long standin_calls(const char *name) {
    pthread_mutex_lock(&lock);
    long n = 0;
    for (int i = 0; i < n_fns; i++)
        if (strcmp(fns[i].name, name) == 0) n = fns[i].calls;
    pthread_mutex_unlock(&lock);
    return n;
}

EXPORT void standin_live(long out[5]) {
    pthread_mutex_lock(&lock);
    long refs = 0;
    for (int i = 0; i < MAX_DEVICES; i++) refs += primary[i].refs;
    out[0] = live_res;
    out[1] = live_alloc;
    out[2] = live_map;
    out[3] = (long)live_bytes;
    out[4] = refs;
    pthread_mutex_unlock(&lock);
}

static Alloc *find_alloc(CUmemGenericAllocationHandle h) {
    for (Alloc *a = allocs; a; a = a->next)
        if ((uintptr_t)a == (uintptr_t)h && a->magic == ALLOC_MAGIC) return a;
    return NULL;
}

EXPORT int standin_handle_flags(unsigned long long h) {
    pthread_mutex_lock(&lock);
    Alloc *a = find_alloc(h);
    int r = a ? (a->posix_fd ? 1 : 0) | (a->rdma ? 2 : 0) : -1;
    pthread_mutex_unlock(&lock);
    return r;
}

/* Every entry point: take the lock, count the call, apply an injected fault,
 * and (except cuInit and the error-name calls) require cuInit. */
#define ENTER(name)                         \
    pthread_mutex_lock(&lock);              \
    {                                       \
        int injected_ = count_call(name);   \
        if (injected_) RETURN(injected_);   \
    }
#define ENTER_INIT(name)                     \
    ENTER(name);                             \
    if (!initialized) RETURN(E_NOT_INITIALIZED)
#define RETURN(code)                 \
    do {                             \
        int rc_ = (code);            \
        pthread_mutex_unlock(&lock); \
        return rc_;                  \
    } while (0)

static Ctx *current(void) { return ctx_depth > 0 ? ctx_stack[ctx_depth - 1] : NULL; }

static int valid_ctx(Ctx *c) {
    return c >= primary && c < primary + MAX_DEVICES && c->magic == CTX_MAGIC && c->refs > 0;
}

/* -------------------------------------------------------- init and devices */
static void parse_env(void) {
    const char *s;
    if ((s = getenv("STANDIN_CUDA_DEVICES"))) n_devices = atoi(s);
    if (n_devices > MAX_DEVICES) n_devices = MAX_DEVICES;
    if (n_devices < 0) n_devices = 0;
    if ((s = getenv("STANDIN_CUDA_TOTAL_MEM"))) total_mem = (size_t)strtoull(s, NULL, 0);
    if ((s = getenv("STANDIN_CUDA_MAP_OFFSET"))) map_offset_accept = strcmp(s, "reject") != 0;
    if ((s = getenv("STANDIN_CUDA_HINT"))) hint_refuse = strcmp(s, "refuse") == 0;
    if ((s = getenv("STANDIN_CUDA_POSIX_FD")))
        posix_fd_mode = strcmp(s, "no") == 0 ? 0 : strcmp(s, "refuse") == 0 ? 2 : 1;
    if ((s = getenv("STANDIN_CUDA_RDMA"))) rdma_supported = atoi(s) != 0;
    if ((s = getenv("STANDIN_CUDA_ABSENT_DEVICE")))
        absent_device_error = strcmp(s, "invalid_value") == 0 ? E_INVALID_VALUE : E_INVALID_DEVICE;
    if ((s = getenv("STANDIN_CUDA_FAIL"))) {
        char *copy = strdup(s), *save = NULL;
        for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            char name[48];
            long k;
            int code;
            if (sscanf(tok, "%47[^:]:%ld:%d", name, &k, &code) == 3) add_fault(name, k, code);
        }
        free(copy);
    }
}

EXPORT CUresult cuInit(unsigned int flags) {
    pthread_mutex_lock(&lock);
    if (!initialized) {
        static int env_read;
        if (!env_read) {
            env_read = 1;
            parse_env();
        }
    }
    {
        int injected = count_call("cuInit");
        if (injected) RETURN(injected);
    }
    if (flags != 0) RETURN(E_INVALID_VALUE);
    if (n_devices == 0) RETURN(E_NO_DEVICE);
    if (!initialized) {
        for (int i = 0; i < MAX_DEVICES; i++) {
            primary[i].magic = CTX_MAGIC;
            primary[i].device = i;
        }
        initialized = 1;
    }
    RETURN(SUCCESS);
}

EXPORT CUresult cuDriverGetVersion(int *version) {
    ENTER("cuDriverGetVersion");
    if (!version) RETURN(E_INVALID_VALUE);
    const char *s = getenv("STANDIN_CUDA_DRIVER_VERSION");
    *version = s ? atoi(s) : 13000;
    RETURN(SUCCESS);
}

EXPORT CUresult cuDeviceGetCount(int *count) {
    ENTER_INIT("cuDeviceGetCount");
    if (!count) RETURN(E_INVALID_VALUE);
    *count = n_devices;
    RETURN(SUCCESS);
}

EXPORT CUresult cuDeviceGet(CUdevice *dev, int ordinal) {
    ENTER_INIT("cuDeviceGet");
    if (!dev) RETURN(E_INVALID_VALUE);
    if (ordinal < 0 || ordinal >= n_devices) RETURN(E_INVALID_DEVICE);
    *dev = ordinal;
    RETURN(SUCCESS);
}

EXPORT CUresult cuDeviceGetName(char *name, int len, CUdevice dev) {
    ENTER_INIT("cuDeviceGetName");
    if (!name || len <= 0) RETURN(E_INVALID_VALUE);
    if (dev < 0 || dev >= n_devices) RETURN(E_INVALID_DEVICE);
    /* Writes the name and its NUL; the rest of the caller's buffer is left as is. */
    char text[64];
    int n = snprintf(text, sizeof text, "vmmpool stand-in GPU %d", dev);
    if (n >= len) n = len - 1;
    memcpy(name, text, (size_t)n);
    name[n] = '\0';
    RETURN(SUCCESS);
}

EXPORT CUresult cuDeviceGetAttribute(int *value, int attrib, CUdevice dev) {
    ENTER_INIT("cuDeviceGetAttribute");
    if (!value) RETURN(E_INVALID_VALUE);
    if (dev < 0 || dev >= n_devices) RETURN(E_INVALID_DEVICE);
    switch (attrib) {
    case 102: /* VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED */
        *value = 1;
        break;
    case 103: /* HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED */
        *value = posix_fd_mode != 0;
        break;
    case 110: /* GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED */
        *value = rdma_supported;
        break;
    case 41: /* UNIFIED_ADDRESSING */
        *value = 1;
        break;
    default:
        if (attrib <= 0 || attrib > 200) RETURN(E_INVALID_VALUE);
        *value = 0;
    }
    RETURN(SUCCESS);
}

EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
    ENTER_INIT("cuDeviceTotalMem");
    if (!bytes) RETURN(E_INVALID_VALUE);
    if (dev < 0 || dev >= n_devices) RETURN(E_INVALID_DEVICE);
    *bytes = total_mem;
    RETURN(SUCCESS);
}

/* ----------------------------------------------------------------- contexts */
EXPORT CUresult cuDevicePrimaryCtxRetain(void **pctx, CUdevice dev) {
    ENTER_INIT("cuDevicePrimaryCtxRetain");
    if (!pctx) RETURN(E_INVALID_VALUE);
    if (dev < 0 || dev >= n_devices) RETURN(E_INVALID_DEVICE);
    primary[dev].refs++;
    *pctx = &primary[dev];
    RETURN(SUCCESS);
}

EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    ENTER_INIT("cuDevicePrimaryCtxRelease");
    if (dev < 0 || dev >= n_devices) RETURN(E_INVALID_DEVICE);
    if (primary[dev].refs <= 0) RETURN(E_INVALID_CONTEXT);
    primary[dev].refs--;
    RETURN(SUCCESS);
}

EXPORT CUresult cuDevicePrimaryCtxGetState(CUdevice dev, unsigned *flags, int *active) {
    ENTER_INIT("cuDevicePrimaryCtxGetState");
    if (!flags || !active) RETURN(E_INVALID_VALUE);
    if (dev < 0 || dev >= n_devices) RETURN(E_INVALID_DEVICE);
    *flags = 0;
    *active = primary[dev].refs > 0;
    RETURN(SUCCESS);
}

EXPORT CUresult cuCtxGetCurrent(void **pctx) {
    ENTER_INIT("cuCtxGetCurrent");
    if (!pctx) RETURN(E_INVALID_VALUE);
    *pctx = current();
    RETURN(SUCCESS);
}

EXPORT CUresult cuCtxSetCurrent(void *ctx) {
    ENTER_INIT("cuCtxSetCurrent");
    if (!ctx) {
        if (ctx_depth > 0) ctx_depth--;
        RETURN(SUCCESS);
    }
    if (!valid_ctx((Ctx *)ctx)) RETURN(E_INVALID_CONTEXT);
    if (ctx_depth == 0) ctx_depth = 1;
    ctx_stack[ctx_depth - 1] = (Ctx *)ctx;
    RETURN(SUCCESS);
}

EXPORT CUresult cuCtxPushCurrent_v2(void *ctx) {
    ENTER_INIT("cuCtxPushCurrent");
    if (!ctx || !valid_ctx((Ctx *)ctx)) RETURN(E_INVALID_CONTEXT);
    if (ctx_depth == STACK_DEPTH) RETURN(E_OUT_OF_MEMORY);
    ctx_stack[ctx_depth++] = (Ctx *)ctx;
    RETURN(SUCCESS);
}

EXPORT CUresult cuCtxPopCurrent_v2(void **pctx) {
    ENTER_INIT("cuCtxPopCurrent");
    if (ctx_depth == 0) RETURN(E_INVALID_CONTEXT);
    Ctx *c = ctx_stack[--ctx_depth];
    if (pctx) *pctx = c;
    RETURN(SUCCESS);
}

EXPORT CUresult cuCtxGetDevice(CUdevice *dev) {
    ENTER_INIT("cuCtxGetDevice");
    if (!dev) RETURN(E_INVALID_VALUE);
    Ctx *c = current();
    if (!c || !valid_ctx(c)) RETURN(E_INVALID_CONTEXT);
    *dev = c->device;
    RETURN(SUCCESS);
}

EXPORT CUresult cuCtxGetDevice_v2(CUdevice *dev, void *ctx) {
    ENTER_INIT("cuCtxGetDevice");
    if (!dev) RETURN(E_INVALID_VALUE);
    Ctx *c = ctx ? (Ctx *)ctx : current();
    if (!c || !valid_ctx(c)) RETURN(E_INVALID_CONTEXT);
    *dev = c->device;
    RETURN(SUCCESS);
}

/* All work is synchronous on the host: synchronizing checks the context only. */
EXPORT CUresult cuCtxSynchronize(void) {
    ENTER_INIT("cuCtxSynchronize");
    Ctx *c = current();
    if (!c || !valid_ctx(c)) RETURN(E_INVALID_CONTEXT);
    RETURN(SUCCESS);
}

EXPORT CUresult cuCtxSynchronize_v2(void *ctx) {
    ENTER_INIT("cuCtxSynchronize");
    Ctx *c = ctx ? (Ctx *)ctx : current();
    if (!c || !valid_ctx(c)) RETURN(E_INVALID_CONTEXT);
    RETURN(SUCCESS);
}

EXPORT CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total_bytes) {
    ENTER_INIT("cuMemGetInfo");
    if (!free_bytes || !total_bytes) RETURN(E_INVALID_VALUE);
    Ctx *c = current();
    if (!c || !valid_ctx(c)) RETURN(E_INVALID_CONTEXT);
    *total_bytes = total_mem;
    *free_bytes = total_mem - used_mem[c->device];
    RETURN(SUCCESS);
}

/* ------------------------------------------------------- streams and events */
static int valid_stream(void *s, int need_ctx) {
    uintptr_t v = (uintptr_t)s;
    if (v <= 2) { /* NULL, CU_STREAM_LEGACY, CU_STREAM_PER_THREAD: the current context's */
        Ctx *c = current();
        return !need_ctx || (c && valid_ctx(c));
    }
    return ((Handle *)s)->magic == STREAM_MAGIC;
}

EXPORT CUresult cuStreamCreate(void **ps, unsigned flags) {
    ENTER_INIT("cuStreamCreate");
    if (!ps || flags > 1) RETURN(E_INVALID_VALUE);
    Ctx *c = current();
    if (!c || !valid_ctx(c)) RETURN(E_INVALID_CONTEXT);
    Handle *h = calloc(1, sizeof *h);
    if (!h) RETURN(E_OUT_OF_MEMORY);
    h->magic = STREAM_MAGIC;
    h->device = c->device;
    *ps = h;
    RETURN(SUCCESS);
}

EXPORT CUresult cuStreamDestroy_v2(void *s) {
    ENTER_INIT("cuStreamDestroy");
    if ((uintptr_t)s <= 2 || ((Handle *)s)->magic != STREAM_MAGIC) RETURN(E_INVALID_HANDLE);
    ((Handle *)s)->magic = 0;
    free(s);
    RETURN(SUCCESS);
}

/* The context a stream belongs to: the current one for the special handles. */
EXPORT CUresult cuStreamGetCtx(void *s, void **pctx) {
    ENTER_INIT("cuStreamGetCtx");
    if (!pctx) RETURN(E_INVALID_VALUE);
    if ((uintptr_t)s <= 2) {
        Ctx *c = current();
        if (!c || !valid_ctx(c)) RETURN(E_INVALID_CONTEXT);
        *pctx = c;
        RETURN(SUCCESS);
    }
    if (((Handle *)s)->magic != STREAM_MAGIC) RETURN(E_INVALID_HANDLE);
    *pctx = &primary[((Handle *)s)->device];
    RETURN(SUCCESS);
}

EXPORT CUresult cuStreamSynchronize(void *s) {
    ENTER_INIT("cuStreamSynchronize");
    if (!valid_stream(s, 1)) RETURN((uintptr_t)s <= 2 ? E_INVALID_CONTEXT : E_INVALID_HANDLE);
    RETURN(SUCCESS);
}

EXPORT CUresult cuEventCreate(void **pe, unsigned flags) {
    ENTER_INIT("cuEventCreate");
    if (!pe || flags > 0xf) RETURN(E_INVALID_VALUE);
    Ctx *c = current();
    if (!c || !valid_ctx(c)) RETURN(E_INVALID_CONTEXT);
    Handle *h = calloc(1, sizeof *h);
    if (!h) RETURN(E_OUT_OF_MEMORY);
    h->magic = EVENT_MAGIC;
    h->device = c->device;
    *pe = h;
    RETURN(SUCCESS);
}

static int valid_event(void *e) { return e && ((Handle *)e)->magic == EVENT_MAGIC; }

EXPORT CUresult cuEventRecord(void *e, void *s) {
    ENTER_INIT("cuEventRecord");
    if (!valid_event(e)) RETURN(E_INVALID_HANDLE);
    if (!valid_stream(s, 1)) RETURN((uintptr_t)s <= 2 ? E_INVALID_CONTEXT : E_INVALID_HANDLE);
    /* "hEvent and hStream must be from the same context otherwise
     * CUDA_ERROR_INVALID_HANDLE is returned" (the special handles name the
     * current context's stream). */
    int stream_device = (uintptr_t)s <= 2 ? current()->device : ((Handle *)s)->device;
    if (stream_device != ((Handle *)e)->device) RETURN(E_INVALID_HANDLE);
    RETURN(SUCCESS); /* work is synchronous: the event completes at once */
}

EXPORT CUresult cuEventQuery(void *e) {
    ENTER_INIT("cuEventQuery");
    if (!valid_event(e)) RETURN(E_INVALID_HANDLE);
    RETURN(SUCCESS);
}

EXPORT CUresult cuEventSynchronize(void *e) {
    ENTER_INIT("cuEventSynchronize");
    if (!valid_event(e)) RETURN(E_INVALID_HANDLE);
    RETURN(SUCCESS);
}

EXPORT CUresult cuEventDestroy_v2(void *e) {
    ENTER_INIT("cuEventDestroy");
    if (!valid_event(e)) RETURN(E_INVALID_HANDLE);
    ((Handle *)e)->magic = 0;
    free(e);
    RETURN(SUCCESS);
}

/* ------------------------------------------------------------ VMM helpers */
static int check_prop(const CUmemAllocationProp *p) {
    if (!p || p->type != 1 || p->location.type != 1) return E_INVALID_VALUE;
    if (p->location.id < 0 || p->location.id >= n_devices) return E_INVALID_DEVICE;
    if (p->requestedHandleTypes & ~(1 | 8)) return E_INVALID_VALUE;
    return SUCCESS;
}

static Res *find_res_containing(uintptr_t a, size_t size) {
    for (Res *r = reservations; r; r = r->next)
        if (a >= r->base && a + size <= r->base + r->size && a + size > a) return r;
    return NULL;
}

static Map *find_map_containing(uintptr_t a) {
    for (Map *m = mappings; m; m = m->next)
        if (a >= m->addr && a < m->addr + m->size) return m;
    return NULL;
}

static Map *find_map_at(uintptr_t a) {
    for (Map *m = mappings; m; m = m->next)
        if (m->addr == a) return m;
    return NULL;
}

/* Whether [a, a+size) is exactly a run of whole adjacent mappings. */
static int whole_mappings(uintptr_t a, size_t size) {
    if (size == 0) return 0;
    uintptr_t cur = a, end = a + size;
    while (cur < end) {
        Map *m = find_map_at(cur);
        if (!m || m->addr + m->size > end) return 0;
        cur += m->size;
    }
    return 1;
}

static void free_alloc_if_dead(Alloc *a) {
    if (a->refs > 0 || a->mappings > 0) return;
    for (Alloc **pp = &allocs; *pp; pp = &(*pp)->next) {
        if (*pp == a) {
            *pp = a->next;
            break;
        }
    }
    close(a->fd);
    if (!a->imported) {
        used_mem[a->device] -= a->size;
        live_bytes -= a->size;
    }
    live_alloc--;
    a->magic = 0;
    free(a);
}

static int host_prot(const Map *m) {
    int best = 0;
    for (int i = 0; i < MAX_DEVICES; i++)
        if (m->access[i] > best) best = m->access[i];
    return best == 3 ? PROT_READ | PROT_WRITE : best == 1 ? PROT_READ : PROT_NONE;
}

/* ---------------------------------------------------------------- VMM calls */
EXPORT CUresult cuMemGetAllocationGranularity(size_t *g, const CUmemAllocationProp *prop, int option) {
    ENTER_INIT("cuMemGetAllocationGranularity");
    if (!g) RETURN(E_INVALID_VALUE);
    int rc = check_prop(prop);
    if (rc) RETURN(rc);
    if (option != 0 && option != 1) RETURN(E_INVALID_VALUE);
    *g = GRANULARITY;
    RETURN(SUCCESS);
}

EXPORT CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr hint,
                                    unsigned long long flags) {
    ENTER_INIT("cuMemAddressReserve");
    if (!ptr || size == 0 || flags != 0) RETURN(E_INVALID_VALUE);
    if (size % GRANULARITY) RETURN(E_INVALID_VALUE);
    if (alignment & (alignment - 1)) RETURN(E_INVALID_VALUE);
    if (alignment < GRANULARITY) alignment = GRANULARITY;
    if (hint && hint_refuse) RETURN(E_INVALID_VALUE);
    void *p = MAP_FAILED;
    if (hint && hint % alignment == 0) {
        p = mmap((void *)(uintptr_t)hint, size, PROT_NONE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
        if (p != MAP_FAILED && (uintptr_t)p != hint) { /* kernels without NOREPLACE */
            munmap(p, size);
            p = MAP_FAILED;
        }
    }
    if (p == MAP_FAILED) {
        size_t span = size + alignment;
        void *q = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (q == MAP_FAILED) RETURN(E_OUT_OF_MEMORY);
        uintptr_t start = ((uintptr_t)q + alignment - 1) & ~(uintptr_t)(alignment - 1);
        if (start > (uintptr_t)q) munmap(q, start - (uintptr_t)q);
        uintptr_t tail = start + size, qend = (uintptr_t)q + span;
        if (qend > tail) munmap((void *)tail, qend - tail);
        p = (void *)start;
    }
    Res *r = calloc(1, sizeof *r);
    if (!r) {
        munmap(p, size);
        RETURN(E_OUT_OF_MEMORY);
    }
    r->base = (uintptr_t)p;
    r->size = size;
    r->next = reservations;
    reservations = r;
    live_res++;
    *ptr = (CUdeviceptr)(uintptr_t)p;
    RETURN(SUCCESS);
}

EXPORT CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) {
    ENTER_INIT("cuMemAddressFree");
    Res **pp = &reservations;
    for (; *pp; pp = &(*pp)->next)
        if ((*pp)->base == ptr && (*pp)->size == size) break;
    if (!*pp) RETURN(E_INVALID_VALUE);
    for (Map *m = mappings; m; m = m->next)
        if (m->addr >= ptr && m->addr < ptr + size) RETURN(E_INVALID_VALUE); /* still mapped */
    Res *r = *pp;
    *pp = r->next;
    munmap((void *)r->base, r->size);
    free(r);
    live_res--;
    RETURN(SUCCESS);
}

static int memfd(size_t size) {
    int fd = (int)syscall(SYS_memfd_create, "standin-cuda", 0u);
    if (fd < 0) return -1;
    if (ftruncate(fd, (off_t)size) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

EXPORT CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop,
                            unsigned long long flags) {
    ENTER_INIT("cuMemCreate");
    if (!handle || flags != 0 || size == 0 || size % GRANULARITY) RETURN(E_INVALID_VALUE);
    int rc = check_prop(prop);
    if (rc) RETURN(rc);
    int want_fd = prop->requestedHandleTypes & 1;
    if (prop->requestedHandleTypes & 8) RETURN(E_NOT_SUPPORTED); /* no fabric here */
    if (want_fd && posix_fd_mode == 0) RETURN(E_NOT_SUPPORTED);
    if (want_fd && posix_fd_mode == 2) RETURN(E_NOT_PERMITTED);
    if (prop->allocFlags.gpuDirectRDMACapable && !rdma_supported) RETURN(E_NOT_SUPPORTED);
    int dev = prop->location.id;
    if (size > total_mem - used_mem[dev]) RETURN(E_OUT_OF_MEMORY);
    Alloc *a = calloc(1, sizeof *a);
    if (!a) RETURN(E_OUT_OF_MEMORY);
    a->fd = memfd(size);
    if (a->fd < 0) {
        free(a);
        RETURN(E_OUT_OF_MEMORY);
    }
    a->magic = ALLOC_MAGIC;
    a->size = size;
    a->device = dev;
    a->refs = 1;
    a->posix_fd = want_fd;
    a->rdma = prop->allocFlags.gpuDirectRDMACapable != 0;
    a->next = allocs;
    allocs = a;
    used_mem[dev] += size;
    live_bytes += size;
    live_alloc++;
    *handle = (CUmemGenericAllocationHandle)(uintptr_t)a;
    RETURN(SUCCESS);
}

EXPORT CUresult cuMemRelease(CUmemGenericAllocationHandle handle) {
    ENTER_INIT("cuMemRelease");
    Alloc *a = find_alloc(handle);
    if (!a || a->refs <= 0) RETURN(E_INVALID_VALUE);
    a->refs--;
    free_alloc_if_dead(a);
    RETURN(SUCCESS);
}

EXPORT CUresult cuMemGetAllocationPropertiesFromHandle(CUmemAllocationProp *prop,
                                                       CUmemGenericAllocationHandle handle) {
    ENTER_INIT("cuMemGetAllocationPropertiesFromHandle");
    Alloc *a = find_alloc(handle);
    if (!prop || !a) RETURN(E_INVALID_VALUE);
    memset(prop, 0, sizeof *prop);
    prop->type = 1;
    prop->requestedHandleTypes = a->posix_fd ? 1 : 0;
    prop->location.type = 1;
    prop->location.id = a->device;
    prop->allocFlags.gpuDirectRDMACapable = (unsigned char)a->rdma;
    RETURN(SUCCESS);
}

EXPORT CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                         unsigned long long flags) {
    ENTER_INIT("cuMemMap");
    Alloc *a = find_alloc(handle);
    if (!a || a->refs <= 0 || flags != 0 || size == 0) RETURN(E_INVALID_VALUE);
    if (ptr % GRANULARITY || size % GRANULARITY || offset % GRANULARITY) RETURN(E_INVALID_VALUE);
    if (offset && !map_offset_accept) RETURN(E_INVALID_VALUE);
    if (offset > a->size || size > a->size - offset) RETURN(E_INVALID_VALUE);
    if (!find_res_containing(ptr, size)) RETURN(E_INVALID_VALUE);
    for (Map *m = mappings; m; m = m->next)
        if (ptr < m->addr + m->size && m->addr < ptr + size) RETURN(E_INVALID_VALUE);
    Map *m = calloc(1, sizeof *m);
    if (!m) RETURN(E_OUT_OF_MEMORY);
    void *p = mmap((void *)(uintptr_t)ptr, size, PROT_NONE, MAP_SHARED | MAP_FIXED, a->fd, (off_t)offset);
    if (p == MAP_FAILED) {
        free(m);
        RETURN(E_OUT_OF_MEMORY);
    }
    m->addr = ptr;
    m->size = size;
    m->alloc = a;
    m->next = mappings;
    mappings = m;
    a->mappings++;
    live_map++;
    RETURN(SUCCESS);
}

EXPORT CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {
    ENTER_INIT("cuMemUnmap");
    if (!whole_mappings(ptr, size)) RETURN(E_INVALID_VALUE);
    uintptr_t cur = ptr, end = ptr + size;
    while (cur < end) {
        Map *m = find_map_at(cur);
        void *p = mmap((void *)cur, m->size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED,
                       -1, 0);
        if (p == MAP_FAILED) RETURN(E_OPERATING_SYSTEM);
        for (Map **pp = &mappings; *pp; pp = &(*pp)->next) {
            if (*pp == m) {
                *pp = m->next;
                break;
            }
        }
        cur += m->size;
        m->alloc->mappings--;
        free_alloc_if_dead(m->alloc);
        free(m);
        live_map--;
    }
    RETURN(SUCCESS);
}

EXPORT CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc, size_t count) {
    ENTER_INIT("cuMemSetAccess");
    if (!desc || count == 0) RETURN(E_INVALID_VALUE);
    for (size_t i = 0; i < count; i++) {
        if (desc[i].location.type != 1) RETURN(E_INVALID_VALUE);
        if (desc[i].location.id < 0 || desc[i].location.id >= n_devices) RETURN(absent_device_error);
        if (desc[i].flags != 0 && desc[i].flags != 1 && desc[i].flags != 3) RETURN(E_INVALID_VALUE);
    }
    if (!whole_mappings(ptr, size)) RETURN(E_INVALID_VALUE);
    uintptr_t cur = ptr, end = ptr + size;
    while (cur < end) {
        Map *m = find_map_at(cur);
        for (size_t i = 0; i < count; i++) m->access[desc[i].location.id] = desc[i].flags;
        if (mprotect((void *)m->addr, m->size, host_prot(m)) != 0) RETURN(E_OPERATING_SYSTEM);
        cur += m->size;
    }
    RETURN(SUCCESS);
}

EXPORT CUresult cuMemGetAccess(unsigned long long *flags, const CUmemLocation *loc, CUdeviceptr ptr) {
    ENTER_INIT("cuMemGetAccess");
    if (!flags || !loc || loc->type != 1) RETURN(E_INVALID_VALUE);
    if (loc->id < 0 || loc->id >= n_devices) RETURN(E_INVALID_DEVICE);
    Map *m = find_map_containing(ptr);
    if (!m) RETURN(E_INVALID_VALUE);
    *flags = (unsigned long long)m->access[loc->id];
    RETURN(SUCCESS);
}

EXPORT CUresult cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *handle, void *addr) {
    ENTER_INIT("cuMemRetainAllocationHandle");
    if (!handle) RETURN(E_INVALID_VALUE);
    Map *m = find_map_containing((uintptr_t)addr);
    if (!m) RETURN(E_INVALID_VALUE);
    m->alloc->refs++;
    *handle = (CUmemGenericAllocationHandle)(uintptr_t)m->alloc;
    RETURN(SUCCESS);
}

EXPORT CUresult cuMemExportToShareableHandle(void *shareable, CUmemGenericAllocationHandle handle, int type,
                                             unsigned long long flags) {
    ENTER_INIT("cuMemExportToShareableHandle");
    Alloc *a = find_alloc(handle);
    if (!shareable || !a || flags != 0) RETURN(E_INVALID_VALUE);
    if (type != 1 || !a->posix_fd) RETURN(E_INVALID_VALUE);
    int fd = dup(a->fd);
    if (fd < 0) RETURN(E_OUT_OF_MEMORY);
    *(int *)shareable = fd;
    RETURN(SUCCESS);
}

EXPORT CUresult cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *handle, void *os_handle, int type) {
    ENTER_INIT("cuMemImportFromShareableHandle");
    if (!handle || type != 1) RETURN(E_INVALID_VALUE);
    int fd = (int)(intptr_t)os_handle;
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || st.st_size <= 0 || st.st_size % GRANULARITY) RETURN(E_INVALID_VALUE);
    Alloc *a = calloc(1, sizeof *a);
    if (!a) RETURN(E_OUT_OF_MEMORY);
    a->fd = dup(fd);
    if (a->fd < 0) {
        free(a);
        RETURN(E_OUT_OF_MEMORY);
    }
    a->magic = ALLOC_MAGIC;
    a->size = (size_t)st.st_size;
    a->refs = 1;
    a->posix_fd = 1;
    a->imported = 1;
    a->next = allocs;
    allocs = a;
    live_alloc++;
    *handle = (CUmemGenericAllocationHandle)(uintptr_t)a;
    RETURN(SUCCESS);
}

/* Whether [a, a+n) is mapped throughout with at least `need` access for `dev`. */
static int accessible(uintptr_t a, size_t n, int dev, int need) {
    uintptr_t cur = a, end = a + n;
    if (end < a) return 0;
    while (cur < end) {
        Map *m = find_map_containing(cur);
        if (!m || (m->access[dev] & need) != need) return 0;
        cur = m->addr + m->size;
    }
    return 1;
}

EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) {
    ENTER_INIT("cuMemcpyHtoD");
    Ctx *c = current();
    if (!c || !valid_ctx(c)) RETURN(E_INVALID_CONTEXT);
    if (n == 0) RETURN(SUCCESS);
    if (!src || !accessible(dst, n, c->device, 3)) RETURN(E_INVALID_VALUE);
    memcpy((void *)(uintptr_t)dst, src, n);
    RETURN(SUCCESS);
}

EXPORT CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
    ENTER_INIT("cuMemcpyDtoH");
    Ctx *c = current();
    if (!c || !valid_ctx(c)) RETURN(E_INVALID_CONTEXT);
    if (n == 0) RETURN(SUCCESS);
    if (!dst || !accessible(src, n, c->device, 1)) RETURN(E_INVALID_VALUE);
    memcpy(dst, (const void *)(uintptr_t)src, n);
    RETURN(SUCCESS);
}

/* -------------------------------------------- page-locked host memory */
/* cuMemHostAlloc / cuMemFreeHost: anonymous memory, tracked so that a free of
 * anything else is CUDA_ERROR_INVALID_VALUE and the async copies can check
 * that their host side is page-locked (as the driver needs for them to be
 * asynchronous). The copies are synchronous here: work completes at once. */
typedef struct HostBlock {
    uintptr_t addr;
    size_t size;
    struct HostBlock *next;
} HostBlock;
static HostBlock *host_blocks;
static long live_host;

static int pinned(uintptr_t a, size_t n) {
    for (HostBlock *b = host_blocks; b; b = b->next)
        if (b->addr <= a && a + n <= b->addr + b->size && a + n >= a) return 1;
    return 0;
}

EXPORT CUresult cuMemHostAlloc(void **pp, size_t bytesize, unsigned flags) {
    ENTER_INIT("cuMemHostAlloc");
    if (!pp || bytesize == 0 || flags > 0xf) RETURN(E_INVALID_VALUE);
    Ctx *c = current();
    if (!c || !valid_ctx(c)) RETURN(E_INVALID_CONTEXT);
    void *p = mmap(NULL, bytesize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) RETURN(E_OUT_OF_MEMORY);
    HostBlock *b = calloc(1, sizeof *b);
    if (!b) {
        munmap(p, bytesize);
        RETURN(E_OUT_OF_MEMORY);
    }
    b->addr = (uintptr_t)p;
    b->size = bytesize;
    b->next = host_blocks;
    host_blocks = b;
    live_host++;
    *pp = p;
    RETURN(SUCCESS);
}

EXPORT CUresult cuMemFreeHost(void *p) {
    ENTER_INIT("cuMemFreeHost");
    for (HostBlock **pb = &host_blocks; *pb; pb = &(*pb)->next) {
        HostBlock *b = *pb;
        if (b->addr == (uintptr_t)p) {
            munmap(p, b->size);
            *pb = b->next;
            free(b);
            live_host--;
            RETURN(SUCCESS);
        }
    }
    RETURN(E_INVALID_VALUE);
}

EXPORT long standin_live_host(void) {
    pthread_mutex_lock(&lock);
    long n = live_host;
    pthread_mutex_unlock(&lock);
    return n;
}

EXPORT CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, void *stream) {
    ENTER_INIT("cuMemcpyDtoHAsync");
    Ctx *c = current();
    if (!c || !valid_ctx(c)) RETURN(E_INVALID_CONTEXT);
    if (!valid_stream(stream, 1)) RETURN((uintptr_t)stream <= 2 ? E_INVALID_CONTEXT : E_INVALID_HANDLE);
    if (n == 0) RETURN(SUCCESS);
    if (!dst || !pinned((uintptr_t)dst, n) || !accessible(src, n, c->device, 1)) RETURN(E_INVALID_VALUE);
    memcpy(dst, (const void *)(uintptr_t)src, n);
    RETURN(SUCCESS);
}

EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, void *stream) {
    ENTER_INIT("cuMemcpyHtoDAsync");
    Ctx *c = current();
    if (!c || !valid_ctx(c)) RETURN(E_INVALID_CONTEXT);
    if (!valid_stream(stream, 1)) RETURN((uintptr_t)stream <= 2 ? E_INVALID_CONTEXT : E_INVALID_HANDLE);
    if (n == 0) RETURN(SUCCESS);
    if (!src || !pinned((uintptr_t)src, n) || !accessible(dst, n, c->device, 3)) RETURN(E_INVALID_VALUE);
    memcpy((void *)(uintptr_t)dst, src, n);
    RETURN(SUCCESS);
}

/* ------------------------------------------------------------ error names */
static const struct {
    int code;
    const char *name, *text;
} errors[] = {
    {0, "CUDA_SUCCESS", "no error"},
    {1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {4, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {34, "CUDA_ERROR_STUB_LIBRARY", "CUDA driver is a stub library"},
    {46, "CUDA_ERROR_DEVICE_UNAVAILABLE", "CUDA-capable device(s) is/are busy or unavailable"},
    {100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {102, "CUDA_ERROR_DEVICE_NOT_LICENSED", "device doesn't have valid Grid license"},
    {201, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {304, "CUDA_ERROR_OPERATING_SYSTEM", "OS call failed or operation not supported on this OS"},
    {400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {500, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {600, "CUDA_ERROR_NOT_READY", "device not ready"},
    {700, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {800, "CUDA_ERROR_NOT_PERMITTED", "operation not permitted"},
    {801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {803, "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH", "system has unsupported display driver / cuda driver combination"},
    {999, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

EXPORT CUresult cuGetErrorName(CUresult err, const char **out) {
    if (!out) return E_INVALID_VALUE;
    for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++) {
        if (errors[i].code == err) {
            *out = errors[i].name;
            return SUCCESS;
        }
    }
    *out = NULL;
    return E_INVALID_VALUE;
}

EXPORT CUresult cuGetErrorString(CUresult err, const char **out) {
    if (!out) return E_INVALID_VALUE;
    for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++) {
        if (errors[i].code == err) {
            *out = errors[i].text;
            return SUCCESS;
        }
    }
    *out = NULL;
    return E_INVALID_VALUE;
}

/* ------------------------------------------------------- cuGetProcAddress */
/* The bindings ask for a base name and the CUDA version they were written
 * against; like the real driver, answer with the newest variant whose
 * version is <= the one asked for (e.g. cuMemcpyHtoD at 3020 is
 * cuMemcpyHtoD_v2, cuCtxSynchronize at 13000 is cuCtxSynchronize_v2). */
#define FN(n) ((void *)(n))
static const struct {
    const char *name;
    int since;
    void *fn;
} procs[] = {
    {"cuInit", 2000, FN(cuInit)},
    {"cuDriverGetVersion", 2020, FN(cuDriverGetVersion)},
    {"cuDeviceGet", 2000, FN(cuDeviceGet)},
    {"cuDeviceGetCount", 2000, FN(cuDeviceGetCount)},
    {"cuDeviceGetName", 2000, FN(cuDeviceGetName)},
    {"cuDeviceGetAttribute", 2000, FN(cuDeviceGetAttribute)},
    {"cuDeviceTotalMem", 3020, FN(cuDeviceTotalMem_v2)},
    {"cuDevicePrimaryCtxRetain", 7000, FN(cuDevicePrimaryCtxRetain)},
    {"cuDevicePrimaryCtxRelease", 11000, FN(cuDevicePrimaryCtxRelease_v2)},
    {"cuDevicePrimaryCtxGetState", 7000, FN(cuDevicePrimaryCtxGetState)},
    {"cuCtxGetCurrent", 4000, FN(cuCtxGetCurrent)},
    {"cuCtxSetCurrent", 4000, FN(cuCtxSetCurrent)},
    {"cuCtxPushCurrent", 4000, FN(cuCtxPushCurrent_v2)},
    {"cuCtxPopCurrent", 4000, FN(cuCtxPopCurrent_v2)},
    {"cuCtxGetDevice", 2000, FN(cuCtxGetDevice)},
    {"cuCtxGetDevice", 13000, FN(cuCtxGetDevice_v2)},
    {"cuCtxSynchronize", 2000, FN(cuCtxSynchronize)},
    {"cuCtxSynchronize", 13000, FN(cuCtxSynchronize_v2)},
    {"cuMemGetInfo", 3020, FN(cuMemGetInfo_v2)},
    {"cuStreamCreate", 2000, FN(cuStreamCreate)},
    {"cuStreamDestroy", 4000, FN(cuStreamDestroy_v2)},
    {"cuStreamSynchronize", 2000, FN(cuStreamSynchronize)},
    {"cuStreamGetCtx", 9020, FN(cuStreamGetCtx)},
    {"cuEventCreate", 2000, FN(cuEventCreate)},
    {"cuEventRecord", 2000, FN(cuEventRecord)},
    {"cuEventQuery", 2000, FN(cuEventQuery)},
    {"cuEventSynchronize", 2000, FN(cuEventSynchronize)},
    {"cuEventDestroy", 4000, FN(cuEventDestroy_v2)},
    {"cuMemGetAllocationGranularity", 10020, FN(cuMemGetAllocationGranularity)},
    {"cuMemAddressReserve", 10020, FN(cuMemAddressReserve)},
    {"cuMemAddressFree", 10020, FN(cuMemAddressFree)},
    {"cuMemCreate", 10020, FN(cuMemCreate)},
    {"cuMemRelease", 10020, FN(cuMemRelease)},
    {"cuMemGetAllocationPropertiesFromHandle", 10020, FN(cuMemGetAllocationPropertiesFromHandle)},
    {"cuMemMap", 10020, FN(cuMemMap)},
    {"cuMemUnmap", 10020, FN(cuMemUnmap)},
    {"cuMemSetAccess", 10020, FN(cuMemSetAccess)},
    {"cuMemGetAccess", 10020, FN(cuMemGetAccess)},
    {"cuMemRetainAllocationHandle", 11000, FN(cuMemRetainAllocationHandle)},
    {"cuMemExportToShareableHandle", 10020, FN(cuMemExportToShareableHandle)},
    {"cuMemImportFromShareableHandle", 10020, FN(cuMemImportFromShareableHandle)},
    {"cuMemcpyHtoD", 3020, FN(cuMemcpyHtoD_v2)},
    {"cuMemcpyDtoH", 3020, FN(cuMemcpyDtoH_v2)},
    {"cuMemHostAlloc", 2020, FN(cuMemHostAlloc)},
    {"cuMemFreeHost", 2000, FN(cuMemFreeHost)},
    {"cuMemcpyDtoHAsync", 3020, FN(cuMemcpyDtoHAsync_v2)},
    {"cuMemcpyHtoDAsync", 3020, FN(cuMemcpyHtoDAsync_v2)},
    {"cuGetErrorName", 6000, FN(cuGetErrorName)},
    {"cuGetErrorString", 6000, FN(cuGetErrorString)},
};

EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, unsigned long long flags,
                                    int *status);

static CUresult lookup(const char *symbol, void **pfn, int version, int *status) {
    int found_name = 0, best = -1;
    if (!symbol || !pfn) return E_INVALID_VALUE;
    *pfn = NULL;
    if (strcmp(symbol, "cuGetProcAddress") == 0 && version >= 12000) {
        *pfn = FN(cuGetProcAddress_v2);
        if (status) *status = 0;
        return SUCCESS;
    }
    for (int i = 0; i < (int)(sizeof procs / sizeof procs[0]); i++) {
        if (strcmp(procs[i].name, symbol) != 0) continue;
        found_name = 1;
        if (procs[i].since <= version && (best < 0 || procs[i].since > procs[best].since)) best = i;
    }
    if (best >= 0) {
        *pfn = procs[best].fn;
        if (status) *status = 0; /* CU_GET_PROC_ADDRESS_SUCCESS */
        return SUCCESS;
    }
    /* 1: SYMBOL_NOT_FOUND, 2: VERSION_NOT_SUFFICIENT */
    if (status) *status = found_name ? 2 : 1;
    return E_NOT_FOUND;
}

EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, unsigned long long flags,
                                    int *status) {
    (void)flags; /* per-thread default stream variants are the same functions here */
    return lookup(symbol, pfn, version, status);
}

EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, unsigned long long flags) {
    (void)flags;
    return lookup(symbol, pfn, version, NULL);
}
