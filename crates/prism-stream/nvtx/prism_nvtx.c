/*
 * prism's NVTX shim: three functions over NVIDIA's header-only NVTX3
 * (vendored in include/nvtx3, Apache-2.0 WITH LLVM-exception, see
 * include/LICENSE.txt). Compiled by prism-stream's build.rs with the
 * system's C compiler; no CUDA toolkit, no GPU and no libnvToolsExt needed.
 *
 * NVTX3 loads a tool at the first call: if NVTX_INJECTION64_PATH names a
 * library exporting InitializeInjectionNvtx2 (Nsight Systems sets it), that
 * library installs its functions; otherwise every NVTX function pointer is
 * set to null and each call is a load and a branch. prism_nvtx_init tells
 * the Rust side which it is, once, so that without a tool prism does not
 * even build the range's name.
 */
#include <stdio.h>
#include <string.h>

#define NVTX_AS_SYSTEM_HEADER
#include "nvtx3/nvToolsExt.h"

/* The domain of prism's ranges (Nsight shows it as a row named "prism"),
 * or null when the tool has no domain API: then plain push/pop with names
 * prefixed "prism: ". Written once by prism_nvtx_init, which the Rust side
 * calls exactly once (std::sync::OnceLock) before any push or pop. */
static nvtxDomainHandle_t prism_domain;
static int prism_use_domain;

/* Loads the tool (if any) and returns 1 when one listens to ranges. */
int prism_nvtx_init(void)
{
    int core;
    int domains;
    nvtxInitialize(NVTX_NULLPTR);
    /* After initialisation an NVTX function pointer is non-null exactly when
     * the tool installed it (nvtxInit.h: the rest are set to no-ops). */
    core = NVTX_VERSIONED_IDENTIFIER(nvtxGlobals).nvtxRangePushA_impl_fnptr != NVTX_NULLPTR
        && NVTX_VERSIONED_IDENTIFIER(nvtxGlobals).nvtxRangePop_impl_fnptr != NVTX_NULLPTR;
    domains = NVTX_VERSIONED_IDENTIFIER(nvtxGlobals).nvtxDomainCreateA_impl_fnptr != NVTX_NULLPTR
        && NVTX_VERSIONED_IDENTIFIER(nvtxGlobals).nvtxDomainRangePushEx_impl_fnptr != NVTX_NULLPTR
        && NVTX_VERSIONED_IDENTIFIER(nvtxGlobals).nvtxDomainRangePop_impl_fnptr != NVTX_NULLPTR;
    if (domains)
    {
        prism_domain = nvtxDomainCreateA("prism");
        prism_use_domain = prism_domain != NVTX_NULLPTR;
    }
    return prism_use_domain || core;
}

/* Pushes a range named `name` (NUL-terminated; the tool copies it) on the
 * calling thread. Only called after prism_nvtx_init returned 1. */
void prism_nvtx_push(const char* name)
{
    if (prism_use_domain)
    {
        nvtxEventAttributes_t attr;
        memset(&attr, 0, sizeof(attr));
        attr.version = NVTX_VERSION;
        attr.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
        attr.messageType = NVTX_MESSAGE_TYPE_ASCII;
        attr.message.ascii = name;
        nvtxDomainRangePushEx(prism_domain, &attr);
    }
    else
    {
        char buf[256];
        snprintf(buf, sizeof(buf), "prism: %s", name);
        nvtxRangePushA(buf);
    }
}

/* Pops the calling thread's innermost prism range. */
void prism_nvtx_pop(void)
{
    if (prism_use_domain)
    {
        nvtxDomainRangePop(prism_domain);
    }
    else
    {
        nvtxRangePop();
    }
}
