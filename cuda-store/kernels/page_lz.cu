// vramblk's page codec on the GPU: a block per 4 KiB page when compressing
// (a warp per SEGMENT-byte piece of it), a warp per page when decompressing.
//
// The format and every step of the search are those of the Rust reference,
// crates/compress/src/lz.rs (read it first): this file must give byte for
// byte what `vramblk_compress::lz::compress` gives, and engine-bench's
// compress check holds it to that on the GPU. The constants below are that
// crate's; a tidy test compares them.
//
// `cargo xtask ptx` turns this file into page_lz.ptx (NVRTC, compute_70),
// which is committed, so building vramblk needs no CUDA.

#define PAGE 4096
#define HASH_BITS 11
#define TABLE (1 << HASH_BITS)
#define CHAIN 4
#define MF_LIMIT 12
#define LAST_LITERALS 5
#define MIN_MATCH 4
#define MAX_COMPRESSED 3968
#define MATCH_STARTS (PAGE - MF_LIMIT)
#define SEGMENT 1024
#define EMPTY 0xffff

// The parse extends the chain's candidates in groups of 8 lanes.
static_assert(CHAIN * 8 == 32, "one group of 8 lanes per candidate");

// compress_pages: a warp per piece, a page per block (17 KiB of shared
// memory).
#define SEGMENTS (PAGE / SEGMENT)
#define THREADS (32 * SEGMENTS)
// The room for a piece's sequences after its first: a sequence takes at
// most a byte fewer than the bytes it covers, plus a byte per 255
// literals, so a piece's take at most SEGMENT + SEGMENT / 255 bytes.
#define BODY (SEGMENT + 32)
// decompress_pages: warps (pages) per block, 2 x 8 KiB of shared memory.
#define DECOMPRESS_WARPS 2
#define FULL 0xffffffffu

// What a page became (PageJob::kind).
#define KIND_COMPRESSED 0
#define KIND_SAME 1
#define KIND_RAW 2
// Set by decompress_pages on a block that is not a page.
#define KIND_CORRUPT 0x80000000u

// One page's job, 32 bytes (cuda-store/src/page_kernels.rs mirrors it).
// compress_pages: src the page, dst a 4096-byte staging slot; it sets
// kind, len (block bytes; 4096 for a raw page, copied whole) and word.
// decompress_pages: src the block (or raw page), dst the page; kind, len
// and word as compress_pages left them.
struct PageJob {
    unsigned long long src;
    unsigned long long dst;
    unsigned long long word;
    unsigned int len;
    unsigned int kind;
};

// The 4 bytes at p[i] as a little-endian word: two aligned loads and a
// funnel shift (p is 16-byte aligned; i + 4 stays inside the page).
__device__ __forceinline__ unsigned int read32(const unsigned char* p, int i) {
    const unsigned int* w = (const unsigned int*)p + (i >> 2);
    return __funnelshift_r(w[0], w[1], (i & 3) * 8);
}

__device__ __forceinline__ unsigned int hash(unsigned int seq) {
    return (seq * 2654435761u) >> (32 - HASH_BITS);
}

// Bytes a length beyond the token's 15 takes (255s, then the rest).
__device__ __forceinline__ int length_bytes(int n) {
    return n >= 15 ? (n - 15) / 255 + 1 : 0;
}

// Lane 0 writes the length extension of `n` at out[o]; returns the new o.
__device__ __forceinline__ int write_length(unsigned char* out, int o, int n, int lane) {
    if (n < 15) return o;
    n -= 15;
    int bytes = n / 255 + 1;
    if (lane == 0) {
        for (int k = 0; k < bytes - 1; k++) out[o + k] = 255;
        out[o + bytes - 1] = (unsigned char)(n % 255);
    }
    return o + bytes;
}

// Whether one of position i's CHAIN candidates holds its 4 bytes.
__device__ __forceinline__ bool has_match(const unsigned char* page,
                                          const unsigned short* cand, int i) {
    unsigned int seq = read32(page, i);
    unsigned short c = cand[i];
    for (int k = 0; k < CHAIN && c != EMPTY; k++) {
        if (read32(page, c) == seq) return true;
        c = cand[c];
    }
    return false;
}

// Threads `t` of `threads` copy `bytes` from shared memory out, 16 at a time.
__device__ __forceinline__ void copy_out(unsigned long long dst, const unsigned char* from,
                                         int bytes, int t, int threads) {
    uint4* d = (uint4*)dst;
    const uint4* s = (const uint4*)from;
    for (int k = t; k < (bytes + 15) / 16; k += threads) d[k] = s[k];
}

// One sequence (token, literal length, literals from `lits`, offset, match
// length) at out[o], written by the warp; returns the new o.
__device__ __forceinline__ int write_sequence(unsigned char* out, int o, const unsigned char* lits,
                                              int lit, int off, int ml, int lane) {
    if (lane == 0) out[o] = (unsigned char)(((lit < 15 ? lit : 15) << 4) | (ml < 15 ? ml : 15));
    o = write_length(out, o + 1, lit, lane);
    for (int k = lane; k < lit; k += 32) out[o + k] = lits[k];
    o += lit;
    if (lane == 0) {
        out[o] = (unsigned char)(off & 0xff);
        out[o + 1] = (unsigned char)(off >> 8);
    }
    return write_length(out, o + 2, ml, lane);
}

// What a warp's parse of its piece left for the block's assembly.
struct Piece {
    int first_start, first_off, first_end;  // its first match; first_end 0: none
    int last_end;                           // where its last match ends
    int body;                               // bytes of its other sequences
    int overflow;                           // never (BODY): the page goes raw
};

extern "C" __global__ void __launch_bounds__(THREADS) compress_pages(PageJob* jobs, unsigned int n) {
    __shared__ __align__(16) unsigned char s_page[PAGE];
    // The hash table during pass 1, the pieces' other sequences after it.
    __shared__ __align__(16) unsigned char s_scratch[SEGMENTS * BODY];
    // The candidates until the parse ends, the block after it.
    __shared__ __align__(16) unsigned short s_cand[MATCH_STARTS];
    // Bit p of word w: position 32 w + p starts a match (pass 1's result
    // for the parse, found 32 positions at a time).
    __shared__ unsigned int s_hits[(MATCH_STARTS + 31) / 32];
    __shared__ Piece s_pieces[SEGMENTS];
    static_assert(SEGMENTS * BODY >= TABLE * 2, "the hash table fits the scratch");
    static_assert(MATCH_STARTS * 2 >= MAX_COMPRESSED, "the block fits the candidates' room");
    static_assert(SEGMENTS * SEGMENT == PAGE, "the pieces make the page");

    const int t = threadIdx.x, warp = t / 32, lane = t % 32;
    if (blockIdx.x >= n) return;
    PageJob* job = &jobs[blockIdx.x];
    unsigned char* page = s_page;
    unsigned short* cand = s_cand;
    unsigned int* hits = s_hits;

    // Every load issued before the first store: the page may be in host
    // memory, a PCIe round trip away.
    const uint4* src = (const uint4*)job->src;
    uint4 v[PAGE / 16 / THREADS];
#pragma unroll
    for (int k = 0; k < PAGE / 16 / THREADS; k++) v[k] = src[t + THREADS * k];
#pragma unroll
    for (int k = 0; k < PAGE / 16 / THREADS; k++) ((uint4*)page)[t + THREADS * k] = v[k];
    __syncthreads();

    // Same-filled: every 8-byte word equal.
    const unsigned long long* words = (const unsigned long long*)page;
    const unsigned long long first = words[0];
    bool same = true;
    for (int k = t; k < PAGE / 8; k += THREADS) same &= words[k] == first;
    if (__syncthreads_and(same)) {
        if (t == 0) {
            job->word = first;
            job->len = 0;
            job->kind = KIND_SAME;
        }
        return;
    }

    // Pass 1, on the first warp: each position's candidate, 32 positions a
    // step. Lanes whose positions hash alike take their nearest lower
    // peer; the highest of them leaves its position in the table for the
    // next step.
    if (warp == 0) {
        unsigned short* table = (unsigned short*)s_scratch;
        for (int k = lane; k < TABLE; k += 32) table[k] = EMPTY;
        __syncwarp();
        for (int base = 0; base < MATCH_STARTS; base += 32) {
            const int pos = base + lane;
            const bool valid = pos < MATCH_STARTS;
            const unsigned int h = valid ? hash(read32(page, pos)) : TABLE + lane;
            const unsigned int peers = __match_any_sync(FULL, h);
            const unsigned int lower = peers & ((1u << lane) - 1u);
            unsigned short c = EMPTY;
            if (lower) c = (unsigned short)(base + 31 - __clz(lower));
            else if (valid) c = table[h];
            __syncwarp();
            if (valid) {
                cand[pos] = c;
                if (lane == 31 - __clz(peers)) table[h] = (unsigned short)pos;
            }
            __syncwarp();
        }
    }
    __syncthreads();

    // Which positions start a match, 32 at a time, the warps in turn.
    for (int base = warp * 32; base < MATCH_STARTS; base += THREADS) {
        const int pos = base + lane;
        const unsigned int m = __ballot_sync(FULL, pos < MATCH_STARTS && has_match(page, cand, pos));
        if (lane == 0) hits[base / 32] = m;
    }
    __syncthreads();

    // Pass 2: each warp parses its piece, every lane walking it alike. A
    // piece's first sequence waits for the assembly (its literals start
    // where an earlier piece's last match ends); the others go to its body.
    const int piece = warp * SEGMENT;
    const int limit = min(piece + SEGMENT, PAGE - LAST_LITERALS);
    const int starts = min(MATCH_STARTS, limit + 1 - MIN_MATCH);
    unsigned char* body = s_scratch + warp * BODY;
    int bp = 0, anchor = piece, stop = piece, i = piece;
    int first_start = 0, first_off = 0, first_end = 0;
    bool overflow = false;
    // Lanes in 4 groups of 8: group g extends the chain's g-th candidate,
    // 8 bytes a step, all four at once.
    const int group = lane / 8, sub = lane % 8;
    while (i < starts) {
        unsigned int word = hits[i / 32] & (FULL << (i % 32));
        if (!word) {
            i = (i / 32 + 1) * 32;
            continue;
        }
        i = (i / 32) * 32 + __ffs(word) - 1;
        if (i >= starts) break;
        const unsigned int seq = read32(page, i);
        unsigned short c = cand[i];
        for (int k = 0; k < group && c != EMPTY; k++) c = cand[c];
        const bool valid = c != EMPTY && read32(page, c) == seq;
        const int off = i - (int)c;
        int end = i + MIN_MATCH;
        bool open = valid;
        for (;;) {
            const int p = end + sub;
            const bool eq = open && p < limit && page[p] == page[p - off];
            const unsigned int stops = (__ballot_sync(FULL, !eq) >> (group * 8)) & 0xffu;
            if (open) {
                if (stops) {
                    end += __ffs(stops) - 1;
                    open = false;
                } else {
                    end += 8;
                }
            }
            if (!__any_sync(FULL, open)) break;
        }
        // The furthest-reaching candidate, the nearest of equals.
        int best_end = 0, best_off = 0;
#pragma unroll
        for (int g = 0; g < CHAIN; g++) {
            const int e = __shfl_sync(FULL, valid ? end : 0, g * 8);
            const int o = __shfl_sync(FULL, off, g * 8);
            if (e > best_end) {
                best_end = e;
                best_off = o;
            }
        }
        int start = i;
        while (start > stop && start > best_off && page[start - 1] == page[start - 1 - best_off])
            start--;
        if (!first_end) {
            first_start = start;
            first_off = best_off;
            first_end = best_end;
        } else {
            const int lit = start - anchor, ml = best_end - start - MIN_MATCH;
            if (bp + 1 + length_bytes(lit) + lit + 2 + length_bytes(ml) > BODY) {
                overflow = true;
                break;
            }
            bp = write_sequence(body, bp, page + anchor, lit, best_off, ml, lane);
        }
        i = anchor = stop = best_end;
    }
    if (lane == 0) {
        Piece* q = &s_pieces[warp];
        q->first_start = first_start;
        q->first_off = first_off;
        q->first_end = first_end;
        q->last_end = anchor;
        q->body = bp;
        q->overflow = overflow;
    }
    __syncthreads();

    // The assembly: where each piece's sequences go in the block, every
    // warp working it out alike; then each writes its own, the last warp
    // the last literals too.
    int at = 0, prev = 0, my_at = 0, my_prev = 0;
    bool fits = true;
    for (int w = 0; w < SEGMENTS; w++) {
        const Piece q = s_pieces[w];
        if (w == warp) {
            my_at = at;
            my_prev = prev;
        }
        fits &= !q.overflow;
        if (q.first_end) {
            const int lit = q.first_start - prev, ml = q.first_end - q.first_start - MIN_MATCH;
            at += 1 + length_bytes(lit) + lit + 2 + length_bytes(ml) + q.body;
            prev = q.last_end;
        }
    }
    const int last = PAGE - prev;
    const int total = at + 1 + length_bytes(last) + last;
    fits &= total <= MAX_COMPRESSED;
    unsigned char* out = (unsigned char*)cand;
    if (fits) {
        const Piece q = s_pieces[warp];
        if (q.first_end) {
            const int lit = q.first_start - my_prev;
            const int o = write_sequence(out, my_at, page + my_prev, lit, q.first_off,
                                         q.first_end - q.first_start - MIN_MATCH, lane);
            for (int k = lane; k < q.body; k += 32) out[o + k] = body[k];
        }
        if (warp == SEGMENTS - 1) {
            if (lane == 0) out[at] = (unsigned char)((last < 15 ? last : 15) << 4);
            const int o = write_length(out, at + 1, last, lane);
            for (int k = lane; k < last; k += 32) out[o + k] = page[prev + k];
        }
    }
    __syncthreads();
    if (fits) {
        copy_out(job->dst, out, total, t, THREADS);
    } else {
        copy_out(job->dst, page, PAGE, t, THREADS);
    }
    if (t == 0) {
        job->word = 0;
        job->len = fits ? (unsigned int)total : PAGE;
        job->kind = fits ? KIND_COMPRESSED : KIND_RAW;
    }
}

extern "C" __global__ void decompress_pages(PageJob* jobs, unsigned int n) {
    __shared__ __align__(16) unsigned char s_page[DECOMPRESS_WARPS][PAGE];
    __shared__ __align__(16) unsigned char s_block[DECOMPRESS_WARPS][PAGE];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const unsigned int idx = blockIdx.x * DECOMPRESS_WARPS + warp;
    if (idx >= n) return;
    PageJob* job = &jobs[idx];
    const unsigned int kind = job->kind;
    uint4* dst = (uint4*)job->dst;

    if (kind == KIND_SAME) {
        const unsigned long long w = job->word;
        const uint4 v = make_uint4((unsigned int)w, (unsigned int)(w >> 32), (unsigned int)w,
                                   (unsigned int)(w >> 32));
        for (int k = lane; k < PAGE / 16; k += 32) dst[k] = v;
        return;
    }
    if (kind == KIND_RAW) {
        const uint4* src = (const uint4*)job->src;
        for (int k = lane; k < PAGE / 16; k += 32) dst[k] = src[k];
        return;
    }
    const int len = (int)job->len;
    if (kind != KIND_COMPRESSED || len < 1 || len > MAX_COMPRESSED) {
        if (lane == 0) job->kind = kind | KIND_CORRUPT;
        return;
    }
    unsigned char* page = s_page[warp];
    unsigned char* block = s_block[warp];
    const uint4* src = (const uint4*)job->src;
    for (int k = lane; k < (len + 15) / 16; k += 32) ((uint4*)block)[k] = src[k];
    __syncwarp();

    int ip = 0, op = 0;
    bool bad = false;
    for (;;) {
        if (ip >= len) { bad = true; break; }
        const int token = block[ip++];
        int lit = token >> 4;
        if (lit == 15) {
            int b;
            do {
                if (ip >= len) { bad = true; break; }
                b = block[ip++];
                lit += b;
            } while (b == 255 && lit <= PAGE);
            if (bad || lit > PAGE) { bad = true; break; }
        }
        if (ip + lit > len || op + lit > PAGE) { bad = true; break; }
        for (int k = lane; k < lit; k += 32) page[op + k] = block[ip + k];
        __syncwarp();
        ip += lit;
        op += lit;
        if (ip == len) break;
        if (ip + 2 > len) { bad = true; break; }
        const int off = block[ip] | (block[ip + 1] << 8);
        ip += 2;
        if (off == 0 || off > op) { bad = true; break; }
        int ml = token & 15;
        if (ml == 15) {
            int b;
            do {
                if (ip >= len) { bad = true; break; }
                b = block[ip++];
                ml += b;
            } while (b == 255 && ml <= PAGE);
            if (bad || ml > PAGE) { bad = true; break; }
        }
        ml += MIN_MATCH;
        if (op + ml > PAGE) { bad = true; break; }
        // A match may overlap what it writes: at most `off` bytes a round.
        while (ml > 0) {
            int step = ml < off ? ml : off;
            if (step > 32) step = 32;
            if (lane < step) page[op + lane] = page[op + lane - off];
            __syncwarp();
            op += step;
            ml -= step;
        }
    }
    if (bad || op != PAGE) {
        if (lane == 0) job->kind = kind | KIND_CORRUPT;
        return;
    }
    __syncwarp();
    for (int k = lane; k < PAGE / 16; k += 32) dst[k] = ((const uint4*)page)[k];
}
