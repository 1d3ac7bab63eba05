/*
 * A stand-in libcuda for the VM suite: the driver entry points vramblk's
 * cuda-store calls, over host memory. "VRAM" is a memfd per allocation
 * (on hugetlb pages with VRAMBLK_STUB_HUGETLB=1, so it sits outside the
 * memory swap relieves, as VRAM does); export/import pass its fd, so the
 * supervisor hand-over and recovery run for real; copies are memcpy, the
 * copy kernel is interpreted (its descriptor table walked on the CPU, page
 * checksums included), as are the page codec's kernels (compress_pages and
 * decompress_pages: vramblk-compress's format and search, written again
 * here in C), every operation completes at once.
 *
 * It lets the --backend cuda path run through the real kernel path where
 * there is no GPU. It is never GPU evidence: no figure from it counts.
 *
 * Fault injection, for the tests of what vramblk does when the GPU fails:
 *   VRAMBLK_STUB_FAIL=ENTRY:N[:sticky]
 *     the N-th call (1-based, counted per process) of driver entry point
 *     ENTRY (its C name: cuLaunchKernel, cuEventQuery,
 *     cuMemcpyHtoDAsync_v2, ...) fails: cuLaunchKernel with
 *     CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, cuEventQuery with
 *     CUDA_ERROR_INVALID_HANDLE, any other with CUDA_ERROR_INVALID_VALUE:
 *     one refused call, the context still good. With ":sticky" that call
 *     and every later driver call of the process fail with
 *     CUDA_ERROR_ILLEGAL_ADDRESS, as after a lost context.
 *   VRAMBLK_STUB_FAIL_ONCE=PATH
 *     only the first process that reaches the fault fires it, creating
 *     PATH; a process that finds PATH there runs clean (so a restarted
 *     server can serve).
 *   VRAMBLK_STUB_FAIL_GPU=I
 *     the fault counts and fires only while stand-in GPU I's context is
 *     current (one GPU of several broken).
 * cuGetErrorString never fails.
 *
 * Several GPUs: VRAMBLK_STUB_GPUS=N stand-in GPUs (default 1), and
 * VRAMBLK_STUB_VRAM_MIB=A,B,... the VRAM of each (MiB; one number for all;
 * default 1024). GPU i sits at PCI address 0000:XX:00.0 with XX = 0x41 +
 * 0x40 * i. Allocations count per process, as one server serves one GPU.
 *
 * Build: cc -shared -fPIC -O2 -o libcuda.so.1 libcuda_stub.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUhandle;

enum {
    OK = 0,
    ERR_INVALID_VALUE = 1,
    ERR_OUT_OF_MEMORY = 2,
    ERR_NOT_FOUND = 500,
};

#define GRANULARITY (2ull << 20)
#define MAX_HANDLES 4096

enum {
    ERR_INVALID_HANDLE = 400,
    ERR_ILLEGAL_ADDRESS = 700,
    ERR_LAUNCH_OUT_OF_RESOURCES = 701,
};

/* Which stand-in GPU's context is current on this thread (cuCtxSetCurrent). */
static __thread int current_dev;

/* Fault injection state (see the header). */
static int fault_parsed, fault_sticky, fault_lost, fault_clean;
static char fault_entry[64];
static unsigned long fault_at, fault_calls;

static void fault_parse(void) {
    const char *spec = getenv("VRAMBLK_STUB_FAIL");
    fault_parsed = 1;
    if (!spec)
        return;
    const char *colon = strchr(spec, ':');
    if (!colon || (size_t)(colon - spec) >= sizeof fault_entry)
        return;
    memcpy(fault_entry, spec, colon - spec);
    fault_entry[colon - spec] = 0;
    char *end;
    fault_at = strtoul(colon + 1, &end, 10);
    fault_sticky = strcmp(end, ":sticky") == 0;
}

/* What entry point `name` returns instead of running: 0 to run. */
static CUresult fault_check(const char *name) {
    if (!fault_parsed)
        fault_parse();
    if (fault_lost)
        return ERR_ILLEGAL_ADDRESS;
    if (fault_clean || !fault_at || strcmp(name, fault_entry) != 0)
        return OK;
    const char *gpu = getenv("VRAMBLK_STUB_FAIL_GPU");
    if (gpu && atoi(gpu) != current_dev)
        return OK;
    if (__atomic_add_fetch(&fault_calls, 1, __ATOMIC_SEQ_CST) != fault_at)
        return OK;
    const char *once = getenv("VRAMBLK_STUB_FAIL_ONCE");
    if (once) {
        int fd = open(once, O_CREAT | O_EXCL | O_WRONLY, 0644);
        if (fd < 0) {
            fault_clean = 1;
            return OK;
        }
        close(fd);
    }
    if (fault_sticky) {
        fault_lost = 1;
        return ERR_ILLEGAL_ADDRESS;
    }
    if (strcmp(name, "cuLaunchKernel") == 0)
        return ERR_LAUNCH_OUT_OF_RESOURCES;
    if (strcmp(name, "cuEventQuery") == 0)
        return ERR_INVALID_HANDLE;
    return ERR_INVALID_VALUE;
}

#define FAULT(name) do { CUresult f_ = fault_check(name); if (f_) return f_; } while (0)

/* Handle h (1-based) is the memfd fds[h - 1]; 0: free slot. */
static int fds[MAX_HANDLES];
static size_t sizes[MAX_HANDLES];
static int dev_of[MAX_HANDLES];
/* Bytes allocated on each stand-in GPU by this process. */
static size_t allocated_on[8];
#define allocated allocated_on[current_dev]
static int dummy;

/* The stand-in GPUs, and which one's context is current. */
static int gpu_count(void) {
    const char *s = getenv("VRAMBLK_STUB_GPUS");
    int n = s ? atoi(s) : 1;
    return n < 1 ? 1 : n > 8 ? 8 : n;
}
static int ctx_of[8];

/* GPU dev's VRAM: the dev-th number of VRAMBLK_STUB_VRAM_MIB, or its last. */
static size_t vram_of(int dev) {
    const char *s = getenv("VRAMBLK_STUB_VRAM_MIB");
    unsigned long long mib = 1024;
    for (int i = 0; s && *s && i <= dev; i++) {
        char *end;
        mib = strtoull(s, &end, 10);
        s = *end == ',' ? end + 1 : end;
    }
    return (size_t)mib << 20;
}
static size_t vram_total(void) { return vram_of(current_dev); }

static CUhandle put(int fd, size_t size) {
    for (int i = 0; i < MAX_HANDLES; i++)
        if (fds[i] == 0) {
            fds[i] = fd + 1; /* stored +1 so fd 0 stays distinguishable */
            sizes[i] = size;
            dev_of[i] = current_dev;
            __atomic_add_fetch(&allocated, size, __ATOMIC_SEQ_CST);
            return (CUhandle)i + 1;
        }
    return 0;
}

static int fd_of(CUhandle h) {
    return (h >= 1 && h <= MAX_HANDLES && fds[h - 1]) ? fds[h - 1] - 1 : -1;
}

CUresult cuInit(unsigned flags) { FAULT("cuInit"); (void)flags; return OK; }
/* VRAMBLK_STUB_DRIVER=11040 (say) reports an older driver: vramblk must then
 * keep off the CUDA 12 entry points (cuStreamWriteValue32_v2). */
CUresult cuDriverGetVersion(int *v) { FAULT("cuDriverGetVersion");
    const char *d = getenv("VRAMBLK_STUB_DRIVER");
    *v = d ? atoi(d) : 12080;
    return OK;
}
/* CU_DEVICE_ATTRIBUTE_ECC_ENABLED (32): VRAMBLK_STUB_ECC=1 makes the stand-in
 * GPU say its memory has ECC on; other attributes are 0. */
/* The PCI domain (50), bus (33) and device (34) say where GPU dev sits. */
CUresult cuDeviceGetAttribute(int *v, int attr, int dev) { FAULT("cuDeviceGetAttribute");
    const char *ecc = getenv("VRAMBLK_STUB_ECC");
    *v = attr == 32 && ecc && *ecc == '1';
    if (attr == 33) *v = 0x41 + 0x40 * dev;
    return OK;
}
CUresult cuDeviceGetCount(int *n) { FAULT("cuDeviceGetCount"); *n = gpu_count(); return OK; }
CUresult cuDeviceGet(int *d, int ordinal) { FAULT("cuDeviceGet");
    if (ordinal < 0 || ordinal >= gpu_count()) return ERR_INVALID_VALUE;
    *d = ordinal;
    return OK;
}
CUresult cuDeviceGetName(char *name, int len, int dev) { FAULT("cuDeviceGetName");
    if (gpu_count() == 1)
        snprintf(name, (size_t)len, "vramblk stub GPU (host memory, not a GPU)");
    else
        snprintf(name, (size_t)len, "vramblk stub GPU %d (host memory, not a GPU)", dev);
    return OK;
}
CUresult cuDevicePrimaryCtxRetain(void **ctx, int dev) { FAULT("cuDevicePrimaryCtxRetain");
    if (dev < 0 || dev >= gpu_count()) return ERR_INVALID_VALUE;
    *ctx = &ctx_of[dev];
    return OK;
}
CUresult cuDevicePrimaryCtxRelease_v2(int dev) { FAULT("cuDevicePrimaryCtxRelease_v2"); (void)dev; return OK; }
CUresult cuCtxSetCurrent(void *ctx) { FAULT("cuCtxSetCurrent");
    for (int i = 0; i < 8; i++)
        if (ctx == &ctx_of[i]) current_dev = i;
    return OK;
}
CUresult cuCtxSynchronize(void) { FAULT("cuCtxSynchronize"); return OK; }
CUresult cuGetErrorString(CUresult r, const char **s) {
    *s = r == OK ? "no error" : r == ERR_OUT_OF_MEMORY ? "out of memory (stub)" : "error (stub)";
    return OK;
}

CUresult cuMemGetInfo_v2(size_t *free_, size_t *total) { FAULT("cuMemGetInfo_v2");
    size_t t = vram_total();
    *total = t;
    *free_ = allocated < t ? t - allocated : 0;
    return OK;
}
CUresult cuMemGetAllocationGranularity(size_t *g, const void *prop, int option) { FAULT("cuMemGetAllocationGranularity");
    (void)prop; (void)option;
    *g = GRANULARITY;
    return OK;
}

CUresult cuMemCreate(CUhandle *h, size_t size, const void *prop, unsigned long long flags) { FAULT("cuMemCreate");
    (void)prop; (void)flags;
    if (allocated + size > vram_total()) return ERR_OUT_OF_MEMORY;
    const char *huge = getenv("VRAMBLK_STUB_HUGETLB");
    unsigned mfd = MFD_CLOEXEC | (huge && *huge == '1' ? MFD_HUGETLB : 0);
    int fd = memfd_create("vramblk-stub-vram", mfd);
    if (fd < 0) return ERR_OUT_OF_MEMORY;
    if (ftruncate(fd, (off_t)size) != 0) { close(fd); return ERR_OUT_OF_MEMORY; }
    *h = put(fd, size);
    if (!*h) { close(fd); return ERR_OUT_OF_MEMORY; }
    return OK;
}
CUresult cuMemExportToShareableHandle(void *out, CUhandle h, int type, unsigned long long flags) { FAULT("cuMemExportToShareableHandle");
    (void)type; (void)flags;
    int fd = fd_of(h);
    if (fd < 0) return ERR_INVALID_VALUE;
    int d = dup(fd);
    if (d < 0) return ERR_INVALID_VALUE;
    *(int *)out = d;
    return OK;
}
CUresult cuMemImportFromShareableHandle(CUhandle *h, void *os_handle, int type) { FAULT("cuMemImportFromShareableHandle");
    (void)type;
    int d = dup((int)(intptr_t)os_handle);
    struct stat st;
    if (d < 0 || fstat(d, &st) != 0) return ERR_INVALID_VALUE;
    *h = put(d, (size_t)st.st_size);
    return *h ? OK : ERR_OUT_OF_MEMORY;
}
CUresult cuMemRelease(CUhandle h) { FAULT("cuMemRelease");
    int fd = fd_of(h);
    if (fd < 0) return ERR_INVALID_VALUE;
    close(fd);
    __atomic_sub_fetch(&allocated_on[dev_of[h - 1]], sizes[h - 1], __ATOMIC_SEQ_CST);
    fds[h - 1] = 0;
    return OK;
}
CUresult cuMemAddressReserve(CUdeviceptr *p, size_t size, size_t align, CUdeviceptr addr, unsigned long long flags) { FAULT("cuMemAddressReserve");
    (void)align; (void)addr; (void)flags;
    /* Huge-page alignment, so hugetlb chunks can be mapped into it. */
    size_t pad = GRANULARITY;
    void *m = mmap(NULL, size + pad, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return ERR_OUT_OF_MEMORY;
    uintptr_t a = ((uintptr_t)m + pad - 1) & ~(uintptr_t)(pad - 1);
    *p = (CUdeviceptr)a;
    return OK;
}
CUresult cuMemAddressFree(CUdeviceptr p, size_t size) { FAULT("cuMemAddressFree"); munmap((void *)(uintptr_t)p, size); return OK; }
CUresult cuMemMap(CUdeviceptr p, size_t size, size_t offset, CUhandle h, unsigned long long flags) { FAULT("cuMemMap");
    (void)flags;
    int fd = fd_of(h);
    if (fd < 0) return ERR_INVALID_VALUE;
    void *m = mmap((void *)(uintptr_t)p, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, (off_t)offset);
    return m == MAP_FAILED ? ERR_OUT_OF_MEMORY : OK;
}
CUresult cuMemUnmap(CUdeviceptr p, size_t size) { FAULT("cuMemUnmap");
    mmap((void *)(uintptr_t)p, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    return OK;
}
CUresult cuMemSetAccess(CUdeviceptr p, size_t size, const void *desc, size_t count) { FAULT("cuMemSetAccess");
    (void)p; (void)size; (void)desc; (void)count;
    return OK;
}

CUresult cuStreamCreate(void **s, unsigned flags) { FAULT("cuStreamCreate"); (void)flags; *s = &dummy; return OK; }
CUresult cuStreamDestroy_v2(void *s) { FAULT("cuStreamDestroy_v2"); (void)s; return OK; }
CUresult cuStreamSynchronize(void *s) { FAULT("cuStreamSynchronize"); (void)s; return OK; }
CUresult cuEventCreate(void **e, unsigned flags) { FAULT("cuEventCreate"); (void)flags; *e = &dummy; return OK; }
CUresult cuEventDestroy_v2(void *e) { FAULT("cuEventDestroy_v2"); (void)e; return OK; }
CUresult cuEventRecord(void *e, void *s) { FAULT("cuEventRecord"); (void)e; (void)s; return OK; }
CUresult cuEventQuery(void *e) { FAULT("cuEventQuery"); (void)e; return OK; }
CUresult cuStreamWaitEvent(void *s, void *e, unsigned flags) { FAULT("cuStreamWaitEvent"); (void)s; (void)e; (void)flags; return OK; }
CUresult cuStreamWriteValue32_v2(void *s, CUdeviceptr addr, unsigned value, unsigned flags) { FAULT("cuStreamWriteValue32_v2");
    const char *d = getenv("VRAMBLK_STUB_DRIVER");
    if (d && atoi(d) < 12000) {
        /* An older libcuda has no such symbol: cudarc would panic. */
        fprintf(stderr, "stub: cuStreamWriteValue32_v2 called on a CUDA %s driver\n", d);
        abort();
    }
    (void)s; (void)flags; *(unsigned *)(uintptr_t)addr = value; return OK;
}

CUresult cuMemHostRegister_v2(void *p, size_t size, unsigned flags) { FAULT("cuMemHostRegister_v2"); (void)p; (void)size; (void)flags; return OK; }
CUresult cuMemHostUnregister(void *p) { FAULT("cuMemHostUnregister"); (void)p; return OK; }
CUresult cuMemHostGetDevicePointer_v2(CUdeviceptr *d, void *p, unsigned flags) { FAULT("cuMemHostGetDevicePointer_v2");
    (void)flags;
    *d = (CUdeviceptr)(uintptr_t)p;
    return OK;
}
CUresult cuMemHostAlloc(void **p, size_t size, unsigned flags) { FAULT("cuMemHostAlloc");
    (void)flags;
    *p = calloc(1, size);
    return *p ? OK : ERR_OUT_OF_MEMORY;
}
CUresult cuMemFreeHost(void *p) { FAULT("cuMemFreeHost"); free(p); return OK; }

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, void *s) { FAULT("cuMemcpyHtoDAsync_v2");
    (void)s; memcpy((void *)(uintptr_t)dst, src, n); return OK;
}
CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, void *s) { FAULT("cuMemcpyDtoHAsync_v2");
    (void)s; memcpy(dst, (const void *)(uintptr_t)src, n); return OK;
}
/* Zeroing whole pages of a memfd mapping punches them out (they read back
 * as zeroes and stop taking memory); anything else is a plain memset. */
static void fill(CUdeviceptr dst, unsigned char v, size_t n) {
    uintptr_t a = (uintptr_t)dst, end = a + n;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = (a + page - 1) & ~(page - 1), hi = end & ~(page - 1);
    if (v == 0 && hi > lo && madvise((void *)lo, hi - lo, MADV_REMOVE) == 0) {
        memset((void *)a, 0, lo - a);
        memset((void *)hi, 0, end - hi);
        return;
    }
    memset((void *)a, v, n);
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void *s) { FAULT("cuMemsetD8Async");
    (void)s; fill(dst, v, n); return OK;
}
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) { FAULT("cuMemsetD8_v2");
    fill(dst, v, n); return OK;
}
CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, void *s) { FAULT("cuMemsetD32Async");
    (void)s;
    for (size_t i = 0; i < n; i++) ((unsigned *)(uintptr_t)dst)[i] = v;
    return OK;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void *s) { FAULT("cuMemcpyDtoDAsync_v2");
    (void)s; memmove((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n); return OK;
}

/* The copy kernel: copy_list(descs, n), each descriptor
 * {u64 src, dst, sums; u32 len, flags} (cuda-store/src/kernel.rs). With
 * the checksum flags each 4 KiB page's CRC32C (no inversions) is stored at
 * sums, or compared with it and a mismatch flagged in the descriptor, as
 * the GPU does; computed here byte by byte, independently of the Rust
 * side's lane arithmetic. */
struct desc {
    unsigned long long src, dst, sums;
    unsigned len, flags;
};
enum { D_COPY = 1, D_STORE_SUM = 2, D_VERIFY_SUM = 4 };
#define D_MISMATCH 0x80000000u

static unsigned crc_table[256];

static unsigned page_crc(const unsigned char *p) {
    if (!crc_table[1])
        for (unsigned b = 0; b < 256; b++) {
            unsigned c = b;
            for (int k = 0; k < 8; k++)
                c = (c >> 1) ^ (0x82f63b78u & -(c & 1));
            crc_table[b] = c;
        }
    unsigned c = 0;
    for (int i = 0; i < 4096; i++)
        c = (c >> 8) ^ crc_table[(c ^ p[i]) & 0xff];
    return c;
}

static void run_desc(struct desc *d) {
    const unsigned char *src = (const unsigned char *)(uintptr_t)d->src;
    if (d->flags & D_COPY)
        memcpy((void *)(uintptr_t)d->dst, src, d->len);
    if (!(d->flags & (D_STORE_SUM | D_VERIFY_SUM)))
        return;
    unsigned *sums = (unsigned *)(uintptr_t)d->sums;
    for (unsigned k = 0; k < d->len / 4096; k++) {
        unsigned c = page_crc(src + (size_t)k * 4096);
        if (d->flags & D_STORE_SUM)
            sums[k] = c;
        if ((d->flags & D_VERIFY_SUM) && sums[k] != c)
            d->flags |= D_MISMATCH;
    }
}

/* The page codec's kernels (cuda-store/kernels/page_lz.cu; the format and
 * every step of the search are crates/compress/src/lz.rs's), run page by
 * page: each job {u64 src, dst, word; u32 len, kind}. */
struct page_job {
    unsigned long long src, dst, word;
    unsigned len, kind;
};
#define PAGE 4096
#define HASH_BITS 11
#define CHAIN 4
#define MF_LIMIT 12
#define LAST_LITERALS 5
#define MIN_MATCH 4
#define MAX_COMPRESSED 3968
#define MATCH_STARTS (PAGE - MF_LIMIT)
#define SEGMENT 1024
#define EMPTY 0xffff
enum { K_COMPRESSED = 0, K_SAME = 1, K_RAW = 2 };
#define K_CORRUPT 0x80000000u
/* Launch shapes, as page_lz.cu's: compress_pages a page per block, a warp
 * per SEGMENT of it; decompress_pages DECOMPRESS_WARPS pages (warps) a block. */
#define COMPRESS_THREADS (32 * PAGE / SEGMENT)
#define DECOMPRESS_WARPS 2

static unsigned read32(const unsigned char *p, int i) {
    return p[i] | (unsigned)p[i + 1] << 8 | (unsigned)p[i + 2] << 16 | (unsigned)p[i + 3] << 24;
}
static unsigned lz_hash(unsigned seq) { return (seq * 2654435761u) >> (32 - HASH_BITS); }

/* Appends to out[*o], refusing to pass MAX_COMPRESSED; 0 when it would. */
static int lz_put(unsigned char *out, int *o, const unsigned char *b, int n) {
    if (*o + n > MAX_COMPRESSED) return 0;
    memcpy(out + *o, b, n);
    *o += n;
    return 1;
}
static int lz_put_byte(unsigned char *out, int *o, unsigned char b) { return lz_put(out, o, &b, 1); }
static int lz_put_length(unsigned char *out, int *o, int n) {
    for (; n >= 255; n -= 255)
        if (!lz_put_byte(out, o, 255)) return 0;
    return lz_put_byte(out, o, (unsigned char)n);
}

/* The block's length, or -1 when it would pass MAX_COMPRESSED. */
static int lz_compress(const unsigned char *page, unsigned char *out) {
    static __thread unsigned short table[1 << HASH_BITS], cand[MATCH_STARTS];
    memset(table, 0xff, sizeof table);
    for (int i = 0; i < MATCH_STARTS; i++) {
        unsigned h = lz_hash(read32(page, i));
        cand[i] = table[h];
        table[h] = (unsigned short)i;
    }
    int o = 0, anchor = 0;
    /* The parse, a SEGMENT-byte piece at a time: matches stay in their piece. */
    for (int piece = 0; piece < PAGE; piece += SEGMENT) {
        int limit = piece + SEGMENT < PAGE - LAST_LITERALS ? piece + SEGMENT : PAGE - LAST_LITERALS;
        int starts = limit + 1 - MIN_MATCH < MATCH_STARTS ? limit + 1 - MIN_MATCH : MATCH_STARTS;
        int stop = piece, i = piece;
        while (i < starts) {
            unsigned seq = read32(page, i);
            int best_end = 0, best_off = 0;
            unsigned c = cand[i];
            for (int k = 0; k < CHAIN && c != EMPTY; k++) {
                if (read32(page, c) == seq) {
                    int off = i - (int)c, end = i + MIN_MATCH;
                    while (end < limit && page[end] == page[end - off]) end++;
                    if (end > best_end) { best_end = end; best_off = off; }
                }
                c = cand[c];
            }
            if (!best_end) { i++; continue; }
            int start = i;
            while (start > stop && start > best_off && page[start - 1] == page[start - 1 - best_off]) start--;
            int lit = start - anchor, ml = best_end - start - MIN_MATCH;
            unsigned char token = (unsigned char)((lit < 15 ? lit : 15) << 4 | (ml < 15 ? ml : 15));
            unsigned char offset[2] = {(unsigned char)best_off, (unsigned char)(best_off >> 8)};
            if (!lz_put_byte(out, &o, token) || (lit >= 15 && !lz_put_length(out, &o, lit - 15)) ||
                !lz_put(out, &o, page + anchor, lit) || !lz_put(out, &o, offset, 2) ||
                (ml >= 15 && !lz_put_length(out, &o, ml - 15)))
                return -1;
            i = anchor = stop = best_end;
        }
    }
    int lit = PAGE - anchor;
    if (!lz_put_byte(out, &o, (unsigned char)((lit < 15 ? lit : 15) << 4)) ||
        (lit >= 15 && !lz_put_length(out, &o, lit - 15)) || !lz_put(out, &o, page + anchor, lit))
        return -1;
    return o;
}

/* 0 when `block` decodes to exactly one page. */
static int lz_decompress(const unsigned char *block, int len, unsigned char *page) {
    int ip = 0, op = 0;
    for (;;) {
        if (ip >= len) return -1;
        int token = block[ip++], lit = token >> 4, b;
        if (lit == 15)
            do {
                if (ip >= len) return -1;
                lit += b = block[ip++];
                if (lit > PAGE) return -1;
            } while (b == 255);
        if (ip + lit > len || op + lit > PAGE) return -1;
        memcpy(page + op, block + ip, lit);
        ip += lit;
        op += lit;
        if (ip == len) break;
        if (ip + 2 > len) return -1;
        int off = block[ip] | block[ip + 1] << 8, ml = token & 15;
        ip += 2;
        if (off == 0 || off > op) return -1;
        if (ml == 15)
            do {
                if (ip >= len) return -1;
                ml += b = block[ip++];
                if (ml > PAGE) return -1;
            } while (b == 255);
        ml += MIN_MATCH;
        if (op + ml > PAGE) return -1;
        for (int k = 0; k < ml; k++, op++) page[op] = page[op - off];
    }
    return op == PAGE ? 0 : -1;
}

static void compress_job(struct page_job *j) {
    const unsigned char *page = (const unsigned char *)(uintptr_t)j->src;
    unsigned char *dst = (unsigned char *)(uintptr_t)j->dst;
    unsigned long long first;
    memcpy(&first, page, 8);
    int same = 1;
    for (int k = 8; k < PAGE && same; k += 8) same = memcmp(page + k, &first, 8) == 0;
    if (same) { j->word = first; j->len = 0; j->kind = K_SAME; return; }
    unsigned char out[MAX_COMPRESSED];
    int len = lz_compress(page, out);
    j->word = 0;
    if (len < 0) { memcpy(dst, page, PAGE); j->len = PAGE; j->kind = K_RAW; return; }
    memcpy(dst, out, len);
    j->len = (unsigned)len;
    j->kind = K_COMPRESSED;
}

static void decompress_job(struct page_job *j) {
    unsigned char *dst = (unsigned char *)(uintptr_t)j->dst;
    if (j->kind == K_SAME) {
        for (int k = 0; k < PAGE; k += 8) memcpy(dst + k, &j->word, 8);
        return;
    }
    if (j->kind == K_RAW) { memcpy(dst, (const void *)(uintptr_t)j->src, PAGE); return; }
    unsigned char page[PAGE];
    if (j->kind != K_COMPRESSED || j->len < 1 || j->len > MAX_COMPRESSED ||
        lz_decompress((const unsigned char *)(uintptr_t)j->src, (int)j->len, page) != 0) {
        j->kind |= K_CORRUPT;
        return;
    }
    memcpy(dst, page, PAGE);
}

/* Modules and functions are tokens: the copy kernel's module, the page
 * codec's. */
static int copy_module, page_module, copy_function, compress_function, decompress_function;
CUresult cuModuleLoadData(void **m, const void *image) { FAULT("cuModuleLoadData");
    if (strstr((const char *)image, ".entry copy_list")) *m = &copy_module;
    else if (strstr((const char *)image, ".entry compress_pages(") &&
             strstr((const char *)image, ".entry decompress_pages("))
        *m = &page_module;
    else return ERR_INVALID_VALUE;
    return OK;
}
CUresult cuModuleUnload(void *m) { FAULT("cuModuleUnload"); (void)m; return OK; }
CUresult cuModuleGetFunction(void **f, void *m, const char *name) { FAULT("cuModuleGetFunction");
    if (m == &copy_module && strcmp(name, "copy_list") == 0) *f = &copy_function;
    else if (m == &page_module && strcmp(name, "compress_pages") == 0) *f = &compress_function;
    else if (m == &page_module && strcmp(name, "decompress_pages") == 0) *f = &decompress_function;
    else return ERR_NOT_FOUND;
    return OK;
}
CUresult cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, void *stream, void **params, void **extra) { FAULT("cuLaunchKernel");
    (void)gy; (void)gz; (void)by; (void)bz; (void)shared; (void)stream; (void)extra;
    if (!params) return ERR_INVALID_VALUE;
    unsigned n = *(unsigned *)params[1];
    if (f == &copy_function) {
        struct desc *d = (struct desc *)(uintptr_t)*(CUdeviceptr *)params[0];
        if (gx != n) return ERR_INVALID_VALUE; /* one block per descriptor */
        for (unsigned i = 0; i < n; i++)
            run_desc(&d[i]);
        return OK;
    }
    if (f != &compress_function && f != &decompress_function) return ERR_INVALID_VALUE;
    /* The shapes page_lz.cu needs. */
    if (f == &compress_function ? bx != COMPRESS_THREADS || gx != n
                                : bx != 32 * DECOMPRESS_WARPS || gx != (n + DECOMPRESS_WARPS - 1) / DECOMPRESS_WARPS)
        return ERR_INVALID_VALUE;
    struct page_job *j = (struct page_job *)(uintptr_t)*(CUdeviceptr *)params[0];
    for (unsigned i = 0; i < n; i++) {
        if (f == &compress_function) compress_job(&j[i]);
        else decompress_job(&j[i]);
    }
    return OK;
}

/* Plain allocations and synchronous copies (engine-bench's baseline and
 * its "another program holds VRAM" check). */
CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t size) { FAULT("cuMemAlloc_v2");
    if (allocated + size > vram_total()) return ERR_OUT_OF_MEMORY;
    void *m = calloc(1, size + sizeof(size_t));
    if (!m) return ERR_OUT_OF_MEMORY;
    *(size_t *)m = size;
    __atomic_add_fetch(&allocated, size, __ATOMIC_SEQ_CST);
    *p = (CUdeviceptr)(uintptr_t)((char *)m + sizeof(size_t));
    return OK;
}
CUresult cuMemFree_v2(CUdeviceptr p) { FAULT("cuMemFree_v2");
    char *m = (char *)(uintptr_t)p - sizeof(size_t);
    __atomic_sub_fetch(&allocated, *(size_t *)m, __ATOMIC_SEQ_CST);
    free(m);
    return OK;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) { FAULT("cuMemcpyHtoD_v2");
    memcpy((void *)(uintptr_t)dst, src, n); return OK;
}
CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) { FAULT("cuMemcpyDtoH_v2");
    memcpy(dst, (const void *)(uintptr_t)src, n); return OK;
}
