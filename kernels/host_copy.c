/*
 * Host-side copies for staging between pageable and page-locked memory.
 * Compiled in every build (with or without nvcc) by a plain C compiler.
 */
#include <stdint.h>
#include <string.h>

#include "prism_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>

void prism_copy_stream(void *dst, const void *src, size_t bytes) {
    unsigned char *d = (unsigned char *)dst;
    const unsigned char *s = (const unsigned char *)src;
    /* Align the destination to 16 bytes: streaming stores need it. */
    size_t head = (16 - ((uintptr_t)d & 15)) & 15;
    if (head > bytes) head = bytes;
    memcpy(d, s, head);
    d += head;
    s += head;
    bytes -= head;
    size_t blocks = bytes / 64;
    for (size_t i = 0; i < blocks; i++) {
        __m128i a = _mm_loadu_si128((const __m128i *)s);
        __m128i b = _mm_loadu_si128((const __m128i *)(s + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(s + 48));
        _mm_stream_si128((__m128i *)d, a);
        _mm_stream_si128((__m128i *)(d + 16), b);
        _mm_stream_si128((__m128i *)(d + 32), c);
        _mm_stream_si128((__m128i *)(d + 48), e);
        d += 64;
        s += 64;
    }
    memcpy(d, s, bytes - blocks * 64);
    /* Streaming stores are weakly ordered: make them visible before return. */
    _mm_sfence();
}
#else
void prism_copy_stream(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }
#endif
