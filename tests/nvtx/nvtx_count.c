/*
 * An NVTX injection library that counts ranges by name: a stand-in for
 * Nsight Systems where it cannot run or make reports (CI, the GPU machine).
 *
 * Build (x86_64 Linux; the headers are the NVTX3 ones prism vendors):
 *   cc -shared -fPIC -O2 -I crates/prism-stream/third_party/nvtx \
 *      tests/nvtx/nvtx_count.c -o libprism_nvtx_count.so -lpthread
 * Use:
 *   NVTX_INJECTION64_PATH=$PWD/libprism_nvtx_count.so \
 *   PRISM_NVTX_COUNT_OUT=counts.tsv  ./my-program
 *
 * NVTX3 (in the program) dlopens the library named by NVTX_INJECTION64_PATH
 * at its first call and calls InitializeInjectionNvtx2, which installs this
 * library's push/pop functions (core and domain API) through the export
 * table NVTX_ETID_CALLBACKS. At exit the counts go to the file named by
 * PRISM_NVTX_COUNT_OUT (stderr without it), as tab-separated lines:
 *
 *   pushes      <ranges pushed, all threads and domains>
 *   pops        <ranges popped>
 *   bad_pops    <pops on a thread with no open range of that domain>
 *   open        <ranges pushed and never popped>
 *   threads     <threads that pushed a range>
 *   range       <domain>  <name>  <count>     (one line per domain and name)
 *
 * The domain of the core API (nvtxRangePushA, ...) is written "-". Tabs
 * and newlines in names become spaces. Marks and start/end ranges are not
 * counted (prism uses neither).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wchar.h>

#define NVTX_NO_IMPL
#include "nvtx3/nvToolsExt.h"

#define MAX_DOMAINS 32
#define MAX_NAMES 4096
#define MAX_NAME 256
/* Open-range depth kept per thread for this many domains (core is slot 0). */
#define DEPTH_SLOTS (MAX_DOMAINS + 1)

struct domain {
    char name[MAX_NAME];
};

struct entry {
    int domain; /* 0: core API; k: domains[k - 1] */
    char name[MAX_NAME];
    unsigned long long count;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct domain domains[MAX_DOMAINS];
static int n_domains;
static struct entry entries[MAX_NAMES];
static int n_entries;
static unsigned long long pushes, pops, bad_pops, threads, dropped_names;
static int report_registered;
/* Per thread: open ranges of each domain slot. */
static __thread long depth[DEPTH_SLOTS];
static __thread int thread_seen;

static void copy_name(char* dst, const char* src)
{
    size_t i = 0;
    for (; src && src[i] && i + 1 < MAX_NAME; i++) {
        char c = src[i];
        dst[i] = (c == '\t' || c == '\n' || c == '\r') ? ' ' : c;
    }
    dst[i] = 0;
}

/* Domain handles are 1-based indices into `domains`, as pointers. */
static int slot_of(nvtxDomainHandle_t d)
{
    size_t k = (size_t)d;
    return (k >= 1 && k <= (size_t)n_domains) ? (int)k : -1;
}

static void count_push(int slot, const char* name)
{
    char clean[MAX_NAME];
    int i;
    copy_name(clean, name ? name : "(null)");
    pthread_mutex_lock(&lock);
    pushes++;
    if (!thread_seen) {
        thread_seen = 1;
        threads++;
    }
    if (slot >= 0 && slot < DEPTH_SLOTS) {
        depth[slot]++;
    }
    for (i = 0; i < n_entries; i++) {
        if (entries[i].domain == slot && strcmp(entries[i].name, clean) == 0) {
            entries[i].count++;
            break;
        }
    }
    if (i == n_entries) {
        if (n_entries < MAX_NAMES) {
            entries[n_entries].domain = slot;
            strcpy(entries[n_entries].name, clean);
            entries[n_entries].count = 1;
            n_entries++;
        } else {
            dropped_names++;
        }
    }
    pthread_mutex_unlock(&lock);
}

/* Returns the depth left on this thread for `slot`, or -1 for a bad pop. */
static int count_pop(int slot)
{
    int level = -1;
    pthread_mutex_lock(&lock);
    if (slot >= 0 && slot < DEPTH_SLOTS && depth[slot] > 0) {
        depth[slot]--;
        level = (int)depth[slot];
        pops++;
    } else {
        bad_pops++;
    }
    pthread_mutex_unlock(&lock);
    return level;
}

/* The message of an event, as text (registered strings are their text). */
static const char* message_of(const nvtxEventAttributes_t* a, char* buf)
{
    if (!a) {
        return "(no attributes)";
    }
    switch (a->messageType) {
    case NVTX_MESSAGE_TYPE_ASCII:
        return a->message.ascii;
    case NVTX_MESSAGE_TYPE_REGISTERED:
        return (const char*)a->message.registered;
    case NVTX_MESSAGE_TYPE_UNICODE: {
        size_t i = 0;
        const wchar_t* w = a->message.unicode;
        for (; w && w[i] && i + 1 < MAX_NAME; i++) {
            buf[i] = (w[i] < 128) ? (char)w[i] : '?';
        }
        buf[i] = 0;
        return buf;
    }
    default:
        return "(no message)";
    }
}

/* ---- the functions installed into the program's NVTX ---- */

static int NVTX_API push_a(const char* message)
{
    count_push(0, message);
    return 0;
}

static int NVTX_API push_ex(const nvtxEventAttributes_t* a)
{
    char buf[MAX_NAME];
    count_push(0, message_of(a, buf));
    return 0;
}

static int NVTX_API pop_core(void)
{
    return count_pop(0);
}

static nvtxDomainHandle_t NVTX_API domain_create_a(const char* name)
{
    size_t handle = 0;
    int k;
    pthread_mutex_lock(&lock);
    for (k = 0; k < n_domains; k++) {
        if (strncmp(domains[k].name, name ? name : "", MAX_NAME - 1) == 0) {
            handle = (size_t)k + 1;
        }
    }
    if (!handle && n_domains < MAX_DOMAINS) {
        copy_name(domains[n_domains].name, name ? name : "");
        n_domains++;
        handle = (size_t)n_domains;
    }
    pthread_mutex_unlock(&lock);
    /* Out of room: ranges of this domain are counted as bad pops and under
     * an unknown domain, so the mismatch shows. */
    return (nvtxDomainHandle_t)(handle ? handle : (size_t)MAX_DOMAINS + 1);
}

static void NVTX_API domain_destroy(nvtxDomainHandle_t d)
{
    (void)d;
}

static nvtxStringHandle_t NVTX_API domain_register_string_a(nvtxDomainHandle_t d, const char* s)
{
    (void)d;
    /* Kept for the process's life: the program may use it at any time. */
    return (nvtxStringHandle_t)strdup(s ? s : "");
}

static int NVTX_API domain_push_ex(nvtxDomainHandle_t d, const nvtxEventAttributes_t* a)
{
    char buf[MAX_NAME];
    count_push(slot_of(d), message_of(a, buf));
    return 0;
}

static int NVTX_API domain_pop(nvtxDomainHandle_t d)
{
    return count_pop(slot_of(d));
}

static void set_slot(NvtxFunctionTable table, unsigned int size, unsigned int id, NvtxFunctionPointer f)
{
    if (table && id < size && table[id]) {
        *table[id] = f;
    }
}

/* ---- the report, at exit ---- */

static void report(void)
{
    const char* path = getenv("PRISM_NVTX_COUNT_OUT");
    FILE* out = (path && *path) ? fopen(path, "w") : NULL;
    unsigned long long open;
    int i;
    if (!out) {
        if (path && *path) {
            fprintf(stderr, "nvtx_count: cannot write %s; counts follow on stderr\n", path);
        }
        out = stderr;
    }
    pthread_mutex_lock(&lock);
    open = pushes - pops;
    fprintf(out, "pushes\t%llu\npops\t%llu\nbad_pops\t%llu\nopen\t%llu\nthreads\t%llu\n",
            pushes, pops, bad_pops, open, threads);
    if (dropped_names) {
        fprintf(out, "dropped_names\t%llu\n", dropped_names);
    }
    for (i = 0; i < n_entries; i++) {
        int d = entries[i].domain;
        const char* dn = d == 0 ? "-" : (d >= 1 && d <= n_domains) ? domains[d - 1].name : "?";
        fprintf(out, "range\t%s\t%s\t%llu\n", dn, entries[i].name, entries[i].count);
    }
    pthread_mutex_unlock(&lock);
    if (out != stderr) {
        fclose(out);
    }
}

/* The entry point NVTX3 looks for in the library it loads. */
__attribute__((visibility("default"))) int InitializeInjectionNvtx2(NvtxGetExportTableFunc_t get_table)
{
    const NvtxExportTableCallbacks* callbacks;
    const NvtxExportTableVersionInfo* version;
    NvtxFunctionTable core = NULL, core2 = NULL;
    unsigned int core_size = 0, core2_size = 0;

    if (!get_table) {
        return 0;
    }
    callbacks = (const NvtxExportTableCallbacks*)get_table(NVTX_ETID_CALLBACKS);
    if (!callbacks || callbacks->struct_size < sizeof(NvtxExportTableCallbacks)
        || !callbacks->GetModuleFunctionTable) {
        return 0;
    }
    version = (const NvtxExportTableVersionInfo*)get_table(NVTX_ETID_VERSIONINFO);
    if (version && version->struct_size >= sizeof(NvtxExportTableVersionInfo)
        && version->SetInjectionNvtxVersion) {
        version->SetInjectionNvtxVersion(NVTX_VERSION);
    }
    if (!callbacks->GetModuleFunctionTable(NVTX_CB_MODULE_CORE, &core, &core_size)
        || !callbacks->GetModuleFunctionTable(NVTX_CB_MODULE_CORE2, &core2, &core2_size)) {
        return 0;
    }
    set_slot(core, core_size, NVTX_CBID_CORE_RangePushA, (NvtxFunctionPointer)push_a);
    set_slot(core, core_size, NVTX_CBID_CORE_RangePushEx, (NvtxFunctionPointer)push_ex);
    set_slot(core, core_size, NVTX_CBID_CORE_RangePop, (NvtxFunctionPointer)pop_core);
    set_slot(core2, core2_size, NVTX_CBID_CORE2_DomainCreateA, (NvtxFunctionPointer)domain_create_a);
    set_slot(core2, core2_size, NVTX_CBID_CORE2_DomainDestroy, (NvtxFunctionPointer)domain_destroy);
    set_slot(core2, core2_size, NVTX_CBID_CORE2_DomainRegisterStringA,
             (NvtxFunctionPointer)domain_register_string_a);
    set_slot(core2, core2_size, NVTX_CBID_CORE2_DomainRangePushEx, (NvtxFunctionPointer)domain_push_ex);
    set_slot(core2, core2_size, NVTX_CBID_CORE2_DomainRangePop, (NvtxFunctionPointer)domain_pop);
    /* Another NVTX instance in the process (a library with NVTX of its own)
     * initialises this library again: one report is enough. */
    pthread_mutex_lock(&lock);
    if (!report_registered) {
        report_registered = 1;
        atexit(report);
    }
    pthread_mutex_unlock(&lock);
    return 1;
}
