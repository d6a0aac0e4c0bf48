/*
 * vmigdb's run-control plugin for QEMU's TCG (plugin API v4, QEMU 10.0).
 *
 * It decides inside QEMU, at guest speed, what would otherwise cost a VM stop: whether a
 * breakpoint hit counts (its process scope and its GDB agent-expression conditions) and where a
 * single-step or a range-step ends. Only a true stop reaches vmigdb: the vCPU is held inside the
 * instruction callback, before the instruction executes, and its registers go to vmigdb with the
 * stop. Under icount QEMU runs every vCPU on one thread, so holding that thread holds the whole
 * machine and its virtual clock: an all-stop that the guest cannot time.
 *
 * Why a held callback and not QEMU's gdbstub: a plugin cannot stop the VM, and a vCPU released
 * from a callback always executes the instruction it was called for (QEMU checks for exit
 * requests only at the start of a translation block, before the plugin's callbacks). So vmigdb
 * serves the held stop itself (registers from here, memory from the guest's RAM file) and the
 * machine goes on when this plugin releases it.
 *
 * Instrumentation is decided at translation: a callback at each breakpoint address, and a
 * conditional "follow" callback on every later instruction of a block holding a breakpoint (a
 * step that starts at a breakpoint ends exactly inside its block). While the user steps, vmigdb
 * turns QEMU's one-insn-per-tb on, so every new block is one instruction and gets a follow
 * callback: each step ends at a block's start, where QEMU's vCPU state is complete. (In the
 * middle of a block QEMU 10.0 has not yet written rip, which hold() replaces, nor its lazily kept
 * flags, which vmigdb then reports unavailable.) A breakpoint added while held calls
 * qemu_plugin_reset from the held vCPU: QEMU flushes its translated code before that vCPU's next
 * block, and until then the follow callbacks re-check the rest of the current block. Not so for
 * one GDB put back after stepping over it, when no code was translated from its address in
 * between (its translations all still have the callback): under icount a flush ends the vCPU's
 * turn on QEMU's one thread, and another busy vCPU's turn then shows in RDTSC-timed code. A
 * breakpoint added while QEMU's gdbstub holds the machine is made to retranslate by vmigdb: it
 * rewrites the instruction's first byte with its own value, through the gdbstub, in every
 * address space that maps it, which makes QEMU drop the code translated from that byte. (QEMU's
 * own breakpoints flush nothing since QEMU 6.2, which checks them before every block.)
 *
 * Watchpoints are the plugin's too: QEMU's own, under icount with several vCPUs, abort QEMU
 * ("Raised interrupt while not in I/O function": a vCPU whose hit was found but not yet reported
 * keeps it after the watchpoint is gone, and raises it in the middle of a later block). While a
 * watchpoint exists every instruction gets a memory callback, which marks a matching access, and
 * a follow callback, which holds the vCPU at the next instruction: after the access, as x86
 * reports data breakpoints. Code translated before the first watchpoint has no memory callbacks:
 * a watchpoint set while held flushes at release; one set while QEMU's gdbstub holds the
 * machine flushes at the next translation (vmigdb turns one-insn-per-tb on until then, so that
 * translation comes at once) and says `flushed`.
 *
 * QEMU 10.0 bug worked around: on a single-threaded TCG (icount), code that reads a scoreboard
 * (conditional callbacks, inline operations) multiplies the translating vCPU's index in place,
 * and that index is a TCG constant there: in a block translated by vCPU 1 every other use of the
 * constant 1 becomes 8, and the guest computes wrong results (seen as a 2-vCPU guest's kernel
 * panicking at boot). With more than one vCPU the follow callbacks are therefore
 * unconditional and test their flag in C.
 *
 * Protocol (one private unix socket, text lines, numbers in hex; vmigdb listens, we connect):
 *   vmigdb -> plugin: reg NUM NAME              name of GDB register NUM for agent `reg`
 *                     want NAME...              the registers a stop reports, in this order
 *                     bp ADDR CR3MASK CR3 [CODE...]  set a breakpoint (CR3MASK 0: any process)
 *                     del ADDR                  remove one
 *                     watch TYPE ADDR LEN       a watchpoint (TYPE as in GDB's Z: 2 write,
 *                                               3 read, 4 access); unwatch TYPE ADDR LEN
 *                     flush                     guest memory was written: flush at release
 *                     stopped                   QEMU's gdbstub stopped the machine: steps end
 *                     setreg NAME VALUE         write a general register of the held vCPU
 *                                               (only after a stop that said it can, below)
 *                     go VCPU MODE LO HI        release the held vCPU: MODE 0 continue,
 *                                               1 step, 2 step while LO <= pc < HI (range)
 *   plugin -> vmigdb: hello VERSION NVCPUS
 *                     stop VCPU KIND PC EXACT REGS  KIND bp|step|error|watch:TYPE:ADDR;
 *                                               EXACT bit 0 clear: inside a block; bit 1
 *                                               set: its general registers are writable;
 *                                               REGS: the wanted registers' bytes as QEMU
 *                                               gives them (little-endian), one hex string
 *                     flushed                   the flush a watchpoint asked for is done
 */
#define _GNU_SOURCE /* process_vm_readv */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#include "qemu_plugin_api.h"

#define EXPORT __attribute__((visibility("default")))
EXPORT int qemu_plugin_version = VMIGDB_PLUGIN_API_VERSION;

#define MAX_BPS 1024 /* open addressing, power of two */
#define MAX_CONDS 8
#define MAX_REGNUM 256
#define STACK_LIMIT 1024
#define MAX_STEPS 100000
#define MAX_WATCH 16
#define SPIN_NS 1000000 /* how long a held vCPU waits awake for vmigdb before it sleeps */

enum follow { FOLLOW_NONE = 0, FOLLOW_STEP = 1, FOLLOW_RECHECK = 2, FOLLOW_WATCH = 3 };
enum watch_type { WATCH_WRITE = 2, WATCH_READ = 3, WATCH_ACCESS = 4 };

struct watch {
    uint64_t addr, len; /* len 0: free */
    int type;
};

struct cond {
    uint8_t *code;
    size_t len;
};

struct bp {
    uint64_t addr; /* 0: free slot */
    int live;      /* 0: deleted (slot kept as a tombstone for probing) */
    int instrumented; /* deleted, and still no translation of addr without its callback */
    uint64_t cr3_mask, cr3;
    int nconds;
    struct cond conds[MAX_CONDS];
};

struct vcpu {
    uint64_t *env;            /* while held and checked: QEMU's state of it (see env_checked) */
    uint64_t *env_seen;       /* that state, once checked */
    uint64_t lo, hi;          /* range step: keep going while lo <= pc < hi */
    uint64_t skip_follow_at;  /* the held address: its own follow callback is not a step */
    uint64_t pc;              /* the instruction being decided (QEMU's rip may lag, see hold) */
    int watch_type;           /* an access a watchpoint matched, reported at the next insn */
    uint64_t watch_addr;
    GByteArray *buf;
};

static qemu_plugin_id_t plugin_id;
static int sock = -1;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t released = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t write_lock = PTHREAD_MUTEX_INITIALIZER;

static struct bp bps[MAX_BPS];
static int step_mode;              /* translation mode: follow callbacks everywhere */
static int retranslate;            /* breakpoints added while held: flush at release */
static int held = -1;              /* the vCPU held at a stop, -1 none */
static unsigned long release_gen;  /* bumped by each `go` */
static int go_mode;
static uint64_t go_lo, go_hi;
static int disconnected;
static int flush_sent;      /* after a disconnect: one reset back to normal mode */
/* Pages holding a breakpoint: vmigdb has QEMU translate them one instruction per block (a
 * gdbstub breakpoint beside ours, vmigdb/hv/qemu/bp_pages.py), and each of their instructions
 * gets a follow callback, so a step from a stop there ends at a block's start (flags exact). */
#define MAX_BP_PAGES 256
static struct { uint64_t page; int n; } bp_pages[MAX_BP_PAGES];
static struct watch watches[MAX_WATCH];
static int nwatch;             /* live watchpoints: memory callbacks on every new block */
static int flush_on_translate; /* a watchpoint came while not held: reset at the next block */
static int announce_flush;     /* say `flushed` when that reset is done */

static struct qemu_plugin_scoreboard *board; /* per vCPU: enum follow (u64) */
static qemu_plugin_u64 follow;
/* QEMU's scoreboard code does not corrupt guest code (see the top). The same bug passes a
 * conditional callback cpu_index * 8 for its vCPU: with one vCPU that is 0, the right index. */
static int cond_cbs_safe;
static struct vcpu *vcpus;
static int nvcpus;

static qemu_plugin_reg_descriptor *regs; /* QEMU's registers, in its gdbstub order */
static unsigned nregs;
static struct qemu_plugin_register *by_regnum[MAX_REGNUM]; /* GDB regnum -> handle */
static char *regnum_name[MAX_REGNUM];
static struct qemu_plugin_register *cr3_handle;
static struct qemu_plugin_register *rip_handle;

/* -- general registers written at a held stop ---------------------------------------------------
 * Plugin API 4 reads registers but cannot write them (API 5, QEMU 10.1, can). On an x86 host TCG
 * keeps the running vCPU's CPUArchState in rbp (TCG_AREG0) throughout translated code, and the
 * callbacks are called from that code: the entry stubs below hand rbp on as a third argument. It
 * is trusted only once checked, at every hold: the 16 general registers read through the API must
 * equal the first 16 words there (CPUX86State.regs, in QEMU's order). Otherwise nothing is
 * written and vmigdb refuses register writes at that stop, as without this. The callbacks are
 * registered with QEMU_PLUGIN_CB_RW_REGS, so the translated code reloads the registers after
 * them: the held instruction and all after it see what was written. Only the general registers:
 * rip is a constant in the translated block, and the flags are kept lazily. */
static const char *const GPR_NAMES[16] = {
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
}; /* in QEMU's order: R_EAX 0, R_ECX 1, R_EDX 2, R_EBX 3, R_ESP 4, R_EBP 5, R_ESI 6, R_EDI 7 */
static struct qemu_plugin_register *gpr_handle[16];
#define MAX_WANT 128
static struct qemu_plugin_register *want[MAX_WANT]; /* what a stop reports, in vmigdb's order */
static int nwant;

/* -- breakpoint table (written only while the machine is held or stopped) --------------------- */

static unsigned slot_of(uint64_t addr) { return (unsigned)((addr * 0x9E3779B97F4A7C15ull) >> 54) & (MAX_BPS - 1); }

/* addr's slot, live or a tombstone; NULL if it has none. */
static struct bp *find_slot(uint64_t addr)
{
    for (unsigned i = slot_of(addr), n = 0; n < MAX_BPS; i = (i + 1) & (MAX_BPS - 1), n++) {
        if (bps[i].addr == 0) return NULL;
        if (bps[i].addr == addr) return &bps[i];
    }
    return NULL;
}

static struct bp *find_bp(uint64_t addr)
{
    struct bp *b = find_slot(addr);
    return b && b->live ? b : NULL;
}

static struct bp *slot_for(uint64_t addr)
{
    struct bp *tomb = NULL;
    for (unsigned i = slot_of(addr), n = 0; n < MAX_BPS; i = (i + 1) & (MAX_BPS - 1), n++) {
        if (bps[i].addr == addr) return &bps[i];
        if (bps[i].addr == 0) return tomb ? tomb : &bps[i];
        if (!bps[i].live && !tomb) tomb = &bps[i];
    }
    return tomb;
}

static void count_bp_page(uint64_t addr, int delta)
{
    uint64_t page = addr & ~0xfffull;
    int free_slot = -1;
    for (int i = 0; i < MAX_BP_PAGES; i++) {
        if (bp_pages[i].n && bp_pages[i].page == page) {
            bp_pages[i].n += delta;
            return;
        }
        if (!bp_pages[i].n && free_slot < 0) free_slot = i;
    }
    if (delta > 0 && free_slot >= 0) {
        bp_pages[free_slot].page = page;
        bp_pages[free_slot].n = delta;
    }
}

static int on_bp_page(uint64_t pc)
{
    for (int i = 0; i < MAX_BP_PAGES; i++)
        if (bp_pages[i].n && bp_pages[i].page == (pc & ~0xfffull)) return 1;
    return 0;
}

static void clear_conds(struct bp *b)
{
    for (int i = 0; i < b->nconds; i++) free(b->conds[i].code);
    b->nconds = 0;
}

static void vmigdb_reset(void);

/* -- talking to vmigdb ------------------------------------------------------------------------- */

static void send_line(const char *line, size_t len)
{
    pthread_mutex_lock(&write_lock);
    while (len > 0 && sock >= 0) {
        ssize_t n = write(sock, line, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        line += n;
        len -= (size_t)n;
    }
    pthread_mutex_unlock(&write_lock);
}

static const char HEX[] = "0123456789abcdef";

static int read_reg(struct vcpu *v, struct qemu_plugin_register *h, uint64_t *value)
{
    if (!h) return -1;
    g_byte_array_set_size(v->buf, 0);
    int n = qemu_plugin_read_register(h, v->buf);
    if (n <= 0) return -1;
    uint64_t x = 0;
    for (int i = 0; i < n && i < 8; i++) x |= (uint64_t)v->buf->data[i] << (8 * i);
    *value = x;
    return 0;
}

/* The machine stopped: no vCPU is stepping any more (GDB asks again if it wants). */
static void cancel_steps(void)
{
    for (int i = 0; i < nvcpus; i++) {
        uint64_t *f = qemu_plugin_scoreboard_find(board, (unsigned)i);
        if (*f == FOLLOW_STEP) *f = FOLLOW_NONE;
    }
}

/* A stepping GDB answers within a few hundred microseconds (its stop's memory reads, then the
 * next step): wait that long awake, yielding the CPU to whoever needs it, since waking a sleeping
 * thread costs as much again on a virtualised host (vmigdb/wire/awake.py has the figures). */
static void spin_while_held(unsigned long gen)
{
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (unsigned i = 0;; i++) {
        if (__atomic_load_n(&release_gen, __ATOMIC_ACQUIRE) != gen) return;
        if (__atomic_load_n(&disconnected, __ATOMIC_ACQUIRE)) return;
        sched_yield();
        if ((i & 7) == 0) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            if ((now.tv_sec - start.tv_sec) * 1000000000L + (now.tv_nsec - start.tv_nsec) > SPIN_NS) return;
        }
    }
}

/* `env` if it is this vCPU's state: its 16 general registers as the API reads them (see GPR_NAMES).
 * Read through process_vm_readv, which fails on memory that is not there instead of faulting:
 * a stray rbp (another QEMU, another host) must cost the write, never QEMU. */
static uint64_t *env_checked(struct vcpu *v, uint64_t *env)
{
    uint64_t words[16];
    struct iovec local = {words, sizeof words}, remote = {env, sizeof words};
    if (env && env == v->env_seen) return env; /* checked before: a vCPU's state does not move */
    if (!env || ((uintptr_t)env & 7)) return NULL;
    if (process_vm_readv(getpid(), &local, 1, &remote, 1, 0) != (ssize_t)sizeof words) return NULL;
    for (int i = 0; i < 16; i++) {
        uint64_t value;
        if (read_reg(v, gpr_handle[i], &value) || value != words[i]) return NULL;
    }
    return v->env_seen = env;
}

/* Report a stop and hold this vCPU (and so, under icount, the machine) until vmigdb says go. */
static void hold(unsigned vcpu_index, const char *kind, uint64_t pc, int exact, uint64_t *env)
{
    struct vcpu *v = &vcpus[vcpu_index];
    size_t cap = 256 + (size_t)nregs * 96, len;
    char *line = malloc(cap);
    if (!line) return;
    uint64_t *checked = env_checked(v, env);
    len = (size_t)snprintf(line, cap, "stop %x %s %llx %d ", vcpu_index, kind, (unsigned long long)pc,
                           (exact ? 1 : 0) | (checked ? 2 : 0));
    for (int w = 0; w < nwant; w++) { /* the registers vmigdb asked for, in its order */
        g_byte_array_set_size(v->buf, 0);
        int n = want[w] ? qemu_plugin_read_register(want[w], v->buf) : 0;
        if (n < 0) n = 0;
        if (want[w] == rip_handle && n >= 8) {
            /* QEMU 10.0 updates the vCPU's rip only at block boundaries: a callback in the middle
             * of a block reads the block's start. The instruction's address is what is meant. */
            for (int i = 0; i < 8; i++) v->buf->data[i] = (uint8_t)(pc >> (8 * i));
        }
        if (len + 2 * (size_t)n + 2 >= cap) break;
        for (int i = 0; i < n; i++) {
            line[len++] = HEX[v->buf->data[i] >> 4];
            line[len++] = HEX[v->buf->data[i] & 15];
        }
    }
    line[len++] = '\n';

    pthread_mutex_lock(&lock);
    while (held >= 0 && !disconnected) pthread_cond_wait(&released, &lock); /* one stop at a time */
    if (disconnected) {
        pthread_mutex_unlock(&lock);
        free(line);
        return;
    }
    held = (int)vcpu_index;
    v->env = checked;
    cancel_steps(); /* a step another vCPU was taking ends with this stop (all-stop) */
    unsigned long gen = release_gen;
    send_line(line, len);
    free(line);
    pthread_mutex_unlock(&lock);
    spin_while_held(gen);
    pthread_mutex_lock(&lock);
    while (release_gen == gen && !disconnected) pthread_cond_wait(&released, &lock);
    int mode = disconnected ? 0 : go_mode;
    v->lo = go_lo;
    v->hi = go_hi;
    v->skip_follow_at = pc;
    *(uint64_t *)qemu_plugin_scoreboard_find(board, vcpu_index) =
        mode ? FOLLOW_STEP : (retranslate ? FOLLOW_RECHECK : FOLLOW_NONE);
    step_mode = mode != 0; /* new one-instruction blocks (vmigdb turned one-insn-per-tb on) */
    int flush = retranslate || flush_on_translate;
    if (flush_on_translate) announce_flush = 1;
    retranslate = 0;
    flush_on_translate = 0;
    held = -1;
    v->env = NULL;
    pthread_cond_broadcast(&released);
    pthread_mutex_unlock(&lock);
    if (flush) vmigdb_reset();
}

/* -- GDB agent expressions (gdbserver's machine: vmigdb/rsp/agent.py is the reference) -------- */

static int agent_eval(struct vcpu *v, const struct cond *c, uint64_t *out)
{
    static __thread uint64_t stack[STACK_LIMIT + 2];
    const uint8_t *code = c->code;
    size_t len = c->len, pc = 0;
    int sp = 0; /* number of values */
    long budget = MAX_STEPS;
#define NEED(n) do { if (sp < (n)) return -1; } while (0)
#define OPERAND(n) do { if (pc + (n) >= len) return -1; } while (0)
#define PUSH(x) do { uint64_t v_ = (x); if (sp >= STACK_LIMIT) return -1; stack[sp] = v_; sp++; } while (0)
#define TOP stack[sp - 1]
    while (pc < len) {
        uint8_t op = code[pc];
        uint64_t a, b;
        switch (op) {
        case 0x02: NEED(2); b = stack[--sp]; TOP += b; pc++; break;
        case 0x03: NEED(2); b = stack[--sp]; TOP -= b; pc++; break;
        case 0x04: NEED(2); b = stack[--sp]; TOP *= b; pc++; break;
        case 0x05: NEED(2); b = stack[--sp]; if (!b) return -1;
            if ((int64_t)TOP == INT64_MIN && (int64_t)b == -1) TOP = (uint64_t)INT64_MIN;
            else TOP = (uint64_t)((int64_t)TOP / (int64_t)b);
            pc++; break;
        case 0x06: NEED(2); b = stack[--sp]; if (!b) return -1; TOP /= b; pc++; break;
        case 0x07: NEED(2); b = stack[--sp]; if (!b) return -1;
            if ((int64_t)b == -1) TOP = 0; else TOP = (uint64_t)((int64_t)TOP % (int64_t)b);
            pc++; break;
        case 0x08: NEED(2); b = stack[--sp]; if (!b) return -1; TOP %= b; pc++; break;
        case 0x09: NEED(2); b = stack[--sp]; TOP <<= (b & 63); pc++; break;
        case 0x0a: NEED(2); b = stack[--sp]; TOP = (uint64_t)((int64_t)TOP >> (b & 63)); pc++; break;
        case 0x0b: NEED(2); b = stack[--sp]; TOP >>= (b & 63); pc++; break;
        case 0x0c: NEED(2); sp -= 2; pc++; break;                   /* trace */
        case 0x0d: NEED(1); OPERAND(1); pc += 2; break;             /* trace_quick */
        case 0x0e: NEED(1); TOP = !TOP; pc++; break;
        case 0x0f: NEED(2); b = stack[--sp]; TOP &= b; pc++; break;
        case 0x10: NEED(2); b = stack[--sp]; TOP |= b; pc++; break;
        case 0x11: NEED(2); b = stack[--sp]; TOP ^= b; pc++; break;
        case 0x12: NEED(1); TOP = ~TOP; pc++; break;
        case 0x13: NEED(2); b = stack[--sp]; TOP = TOP == b; pc++; break;
        case 0x14: NEED(2); b = stack[--sp]; TOP = (int64_t)TOP < (int64_t)b; pc++; break;
        case 0x15: NEED(2); b = stack[--sp]; TOP = TOP < b; pc++; break;
        case 0x16: case 0x2a: {                                     /* ext, zero_ext */
            NEED(1); OPERAND(1);
            unsigned bits = code[pc + 1];
            if (bits < 64) {
                uint64_t mask = (1ull << bits) - 1;
                a = TOP & mask;
                if (op == 0x16 && bits > 0 && (a >> (bits - 1)) & 1) a |= ~mask;
                TOP = a;
            }
            pc += 2;
            break;
        }
        case 0x17: case 0x18: case 0x19: case 0x1a: {               /* ref8..ref64 */
            NEED(1);
            size_t size = (size_t)1 << (op - 0x17);
            g_byte_array_set_size(v->buf, 0);
            if (!qemu_plugin_read_memory_vaddr(TOP, v->buf, size) || v->buf->len < size) return -1;
            a = 0;
            for (size_t i = 0; i < size; i++) a |= (uint64_t)v->buf->data[i] << (8 * i);
            TOP = a;
            pc++;
            break;
        }
        case 0x20: case 0x21: {                                     /* if_goto, goto */
            OPERAND(2);
            size_t target = ((size_t)code[pc + 1] << 8) | code[pc + 2];
            int jump = 1;
            if (op == 0x20) { NEED(1); jump = stack[--sp] != 0; }
            if (!jump) { pc += 3; break; }
            if (target <= pc && (budget -= (long)len) < 0) return -1;
            pc = target;
            break;
        }
        case 0x22: OPERAND(1); PUSH(code[pc + 1]); pc += 2; break;
        case 0x23: OPERAND(2); PUSH(((uint64_t)code[pc + 1] << 8) | code[pc + 2]); pc += 3; break;
        case 0x24: case 0x25: {                                     /* const32, const64 */
            size_t n = op == 0x24 ? 4 : 8;
            OPERAND(n);
            a = 0;
            for (size_t i = 1; i <= n; i++) a = (a << 8) | code[pc + i];
            PUSH(a);
            pc += n + 1;
            break;
        }
        case 0x26: {                                                /* reg */
            OPERAND(2);
            unsigned num = ((unsigned)code[pc + 1] << 8) | code[pc + 2];
            if (num < MAX_REGNUM && rip_handle && by_regnum[num] == rip_handle)
                a = v->pc;
            else if (num >= MAX_REGNUM || !by_regnum[num] || read_reg(v, by_regnum[num], &a))
                return -1;
            PUSH(a);
            pc += 3;
            break;
        }
        case 0x27: NEED(1); *out = TOP; return 0;                   /* end */
        case 0x28: NEED(1); PUSH(TOP); pc++; break;                 /* dup */
        case 0x29: NEED(1); sp--; pc++; break;                      /* pop */
        case 0x2b: NEED(2); a = TOP; TOP = stack[sp - 2]; stack[sp - 2] = a; pc++; break;
        case 0x2e: OPERAND(2); pc += 3; break;                      /* tracev */
        case 0x2f: NEED(2); sp -= 2; pc++; break;                   /* tracenz */
        case 0x30: NEED(1); OPERAND(2); pc += 3; break;             /* trace16 */
        case 0x32: {                                                /* pick */
            OPERAND(1);
            unsigned n = code[pc + 1];
            NEED((int)n + 1);
            PUSH(stack[sp - 1 - n]);
            pc += 2;
            break;
        }
        case 0x33: NEED(3); a = stack[sp - 1]; stack[sp - 1] = stack[sp - 2];  /* rot */
            stack[sp - 2] = stack[sp - 3]; stack[sp - 3] = a; pc++; break;
        default: return -1; /* float, getv/setv (no trace variables here), printf, unknown */
        }
    }
    return -1; /* ran off the end */
#undef NEED
#undef OPERAND
#undef PUSH
#undef TOP
}

/*
 * A callback's udata: the instruction's address and whether it starts its translation block,
 * packed as (pc << 1) | first. x86-64 addresses are canonical (bit 63 equals bit 62), so an
 * arithmetic shift gives the address back. Only at a block's start is all of QEMU's lazily
 * written vCPU state in place: in the middle of a block its flags (cc_op) can lag.
 */
static void *pack(uint64_t pc, int first) { return (void *)(uintptr_t)((pc << 1) | (first ? 1 : 0)); }
static uint64_t unpack_pc(void *udata) { return (uint64_t)((int64_t)(uintptr_t)udata >> 1); }
static int unpack_first(void *udata) { return (int)((uintptr_t)udata & 1); }

/* -- callbacks ---------------------------------------------------------------------------------- */

/* Whether breakpoint `b` counts on this vCPU now: -1 cannot tell (report), 0 no, 1 yes. */
static int counts(struct vcpu *v, const struct bp *b, uint64_t pc)
{
    v->pc = pc;
    if (b->cr3_mask) {
        uint64_t cr3;
        if (read_reg(v, cr3_handle, &cr3)) return -1;
        if ((cr3 & b->cr3_mask) != b->cr3) return 0;
    }
    if (b->nconds == 0) return 1;
    for (int i = 0; i < b->nconds; i++) {
        uint64_t value;
        if (agent_eval(v, &b->conds[i], &value)) return -1;
        if (value) return 1;
    }
    return 0;
}

__attribute__((used)) static void on_breakpoint_env(unsigned int vcpu_index, void *udata, uint64_t *env)
{
    uint64_t pc = unpack_pc(udata);
    struct bp *b = find_bp(pc);
    if (!b) return;
    int verdict = counts(&vcpus[vcpu_index], b, pc);
    if (verdict) hold(vcpu_index, verdict > 0 ? "bp" : "error", pc, unpack_first(udata), env);
}

__attribute__((used)) static void on_follow_env(unsigned int vcpu_index, void *udata, uint64_t *env)
{
    uint64_t pc = unpack_pc(udata);
    if (vcpu_index >= (unsigned)nvcpus) return;
    struct vcpu *v = &vcpus[vcpu_index];
    uint64_t *f = qemu_plugin_scoreboard_find(board, vcpu_index);
    if (*f == FOLLOW_NONE) return; /* what the conditional form tests before calling */
    if (v->watch_type && !disconnected) { /* the instruction that made the access is done */
        char kind[48];
        snprintf(kind, sizeof kind, "watch:%x:%llx", v->watch_type, (unsigned long long)v->watch_addr);
        v->watch_type = 0;
        hold(vcpu_index, kind, pc, unpack_first(udata), env); /* sets this vCPU's follow state anew */
        return;
    }
    if (*f == FOLLOW_WATCH) { /* a watchpoint removed since its access */
        *f = FOLLOW_NONE;
        return;
    }
    if (v->skip_follow_at == pc) { /* the held instruction itself, about to execute */
        v->skip_follow_at = 0;
        return;
    }
    v->skip_follow_at = 0;
    if (disconnected) {
        *f = FOLLOW_NONE;
        if (!__atomic_exchange_n(&flush_sent, 1, __ATOMIC_SEQ_CST)) vmigdb_reset();
        return;
    }
    if (*f == FOLLOW_RECHECK) {
        /* A breakpoint added while held, in code translated before it: decide it here. */
        struct bp *b = find_bp(pc);
        if (b) {
            int verdict = counts(v, b, pc);
            if (verdict) hold(vcpu_index, verdict > 0 ? "bp" : "error", pc, unpack_first(udata), env);
        }
        return;
    }
    if (*f == FOLLOW_STEP && !(v->lo <= pc && pc < v->hi)) {
        *f = FOLLOW_NONE;
        hold(vcpu_index, "step", pc, unpack_first(udata), env);
    }
}

/* The callbacks' entry stubs: rbp, the vCPU's state in translated code, as the third argument. */
#if defined(__x86_64__)
#define ENV_STUB(stub, target)                                                                      \
    __asm__(".text\n.p2align 4\n.globl " #stub "\n.hidden " #stub "\n.type " #stub ",@function\n" \
            #stub ":\n\tmovq %rbp, %rdx\n\tjmp " #target "\n.size " #stub ", .-" #stub "\n");
ENV_STUB(on_breakpoint, on_breakpoint_env)
ENV_STUB(on_follow, on_follow_env)
void on_breakpoint(unsigned int vcpu_index, void *udata);
void on_follow(unsigned int vcpu_index, void *udata);
#else
static void on_breakpoint(unsigned int vcpu_index, void *udata) { on_breakpoint_env(vcpu_index, udata, NULL); }
static void on_follow(unsigned int vcpu_index, void *udata) { on_follow_env(vcpu_index, udata, NULL); }
#endif

/* A guest access: does a watchpoint match it? The hold comes at the next instruction. */
static void on_mem(unsigned int vcpu_index, qemu_plugin_meminfo_t info, uint64_t vaddr, void *udata)
{
    if (!nwatch || vcpu_index >= (unsigned)nvcpus) return;
    uint64_t size = 1ull << qemu_plugin_mem_size_shift(info);
    int store = qemu_plugin_mem_is_store(info);
    for (int i = 0; i < MAX_WATCH; i++) {
        const struct watch *w = &watches[i];
        if (!w->len || vaddr >= w->addr + w->len || w->addr >= vaddr + size) continue;
        if ((w->type == WATCH_WRITE && !store) || (w->type == WATCH_READ && store)) continue;
        struct vcpu *v = &vcpus[vcpu_index];
        v->watch_type = w->type;
        v->watch_addr = w->addr;
        uint64_t *f = qemu_plugin_scoreboard_find(board, vcpu_index);
        if (*f == FOLLOW_NONE) *f = FOLLOW_WATCH;
        return;
    }
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    int seen_bp = 0, watching = nwatch > 0;
    if (flush_on_translate) { /* from a vCPU, where QEMU can flush: this block is instrumented */
        flush_on_translate = 0;
        announce_flush = 1;
        vmigdb_reset();
    }
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint64_t pc = qemu_plugin_insn_vaddr(insn);
        void *udata = pack(pc, i == 0);
        struct bp *b = find_slot(pc);
        if (b && !b->live) b->instrumented = 0; /* a deleted breakpoint's code, without it */
        if (b && b->live) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_breakpoint, QEMU_PLUGIN_CB_RW_REGS, udata);
            seen_bp = 1;
        }
        if (watching)
            qemu_plugin_register_vcpu_mem_cb(insn, on_mem, QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_MEM_RW, NULL);
        if (!step_mode && !seen_bp && !watching && !on_bp_page(pc)) continue;
        if (cond_cbs_safe)
            qemu_plugin_register_vcpu_insn_exec_cond_cb(insn, on_follow, QEMU_PLUGIN_CB_RW_REGS,
                                                        QEMU_PLUGIN_COND_NE, follow, FOLLOW_NONE,
                                                        udata);
        else
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_follow, QEMU_PLUGIN_CB_RW_REGS, udata);
    }
}

static void on_vcpu_init(qemu_plugin_id_t id, unsigned int vcpu_index)
{
    if (vcpu_index < (unsigned)nvcpus && !vcpus[vcpu_index].buf)
        vcpus[vcpu_index].buf = g_byte_array_new();
    if (regs) return;
    GArray *all = qemu_plugin_get_registers();
    regs = (qemu_plugin_reg_descriptor *)all->data;
    nregs = all->len;
    for (unsigned r = 0; r < nregs; r++)
        if (!strcmp(regs[r].name, "cr3")) cr3_handle = regs[r].handle;
        else if (!strcmp(regs[r].name, "rip")) rip_handle = regs[r].handle;
    for (unsigned r = 0; r < nregs; r++)
        for (int i = 0; i < 16; i++)
            if (!strcmp(regs[r].name, GPR_NAMES[i])) gpr_handle[i] = regs[r].handle;
    for (unsigned n = 0; n < MAX_REGNUM; n++)
        for (unsigned r = 0; regnum_name[n] && r < nregs; r++)
            if (!strcmp(regs[r].name, regnum_name[n])) by_regnum[n] = regs[r].handle;
    char hello[64];
    int len = snprintf(hello, sizeof hello, "hello %x %x\n", VMIGDB_PLUGIN_API_VERSION, nvcpus);
    send_line(hello, (size_t)len);
}

static void register_callbacks(void)
{
    qemu_plugin_register_vcpu_init_cb(plugin_id, on_vcpu_init);
    qemu_plugin_register_vcpu_tb_trans_cb(plugin_id, on_translate);
}

static void on_reset(qemu_plugin_id_t id)
{
    /* All vCPUs are outside translated code and QEMU has flushed it: switch modes now. */
    pthread_mutex_lock(&lock);
    for (int i = 0; i < nvcpus; i++) { /* everything is retranslated: nothing left to re-check */
        uint64_t *f = qemu_plugin_scoreboard_find(board, (unsigned)i);
        if (*f == FOLLOW_RECHECK) *f = FOLLOW_NONE;
    }
    int announce = announce_flush;
    announce_flush = 0;
    pthread_mutex_unlock(&lock);
    register_callbacks();
    if (announce) send_line("flushed\n", 8);
}

static void vmigdb_reset(void) { qemu_plugin_reset(plugin_id, on_reset); }

/* -- the command reader ------------------------------------------------------------------------- */

static uint8_t *unhex(const char *s, size_t *len)
{
    size_t n = strlen(s) / 2;
    uint8_t *out = malloc(n ? n : 1);
    for (size_t i = 0; out && i < n; i++) {
        unsigned byte;
        if (sscanf(s + 2 * i, "%2x", &byte) != 1) { free(out); return NULL; }
        out[i] = (uint8_t)byte;
    }
    *len = n;
    return out;
}

static void command(char *line)
{
    char *save = NULL, *verb = strtok_r(line, " ", &save);
    if (!verb) return;
    pthread_mutex_lock(&lock);
    if (!strcmp(verb, "reg")) {
        char *num = strtok_r(NULL, " ", &save), *name = strtok_r(NULL, " ", &save);
        unsigned n = num ? (unsigned)strtoul(num, NULL, 16) : MAX_REGNUM;
        if (name && n < MAX_REGNUM) {
            free(regnum_name[n]);
            regnum_name[n] = strdup(name);
            for (unsigned r = 0; r < nregs; r++)
                if (!strcmp(regs[r].name, name)) by_regnum[n] = regs[r].handle;
        }
    } else if (!strcmp(verb, "want")) {
        nwant = 0;
        for (char *name; (name = strtok_r(NULL, " ", &save)) && nwant < MAX_WANT; nwant++) {
            want[nwant] = NULL; /* unknown to QEMU: reported empty, vmigdb sees the stop short */
            for (unsigned r = 0; r < nregs; r++)
                if (!strcmp(regs[r].name, name)) want[nwant] = regs[r].handle;
        }
    } else if (!strcmp(verb, "bp")) {
        char *a = strtok_r(NULL, " ", &save), *m = strtok_r(NULL, " ", &save),
             *c = strtok_r(NULL, " ", &save);
        if (a && m && c) {
            uint64_t addr = strtoull(a, NULL, 16);
            struct bp *b = slot_for(addr);
            if (b && addr) {
                int added = !(b->addr == addr && b->live);
                /* GDB takes a breakpoint out to step over it, and puts it back: if no code was
                 * translated from addr meanwhile, every translation still has the callback, and
                 * nothing needs retranslating (a flush would end the vCPU's turn on QEMU's one
                 * icount thread at its next block, and under load give another vCPU's turn to
                 * the guest code it interrupts, which an RDTSC-timed block sees). */
                int instrumented = b->addr == addr && !b->live && b->instrumented;
                clear_conds(b);
                b->addr = addr;
                b->cr3_mask = strtoull(m, NULL, 16);
                b->cr3 = strtoull(c, NULL, 16);
                for (char *code; (code = strtok_r(NULL, " ", &save)) && b->nconds < MAX_CONDS;) {
                    struct cond *k = &b->conds[b->nconds];
                    if ((k->code = unhex(code, &k->len))) b->nconds++;
                }
                b->live = 1;
                if (added) count_bp_page(addr, 1);
                if (added && held >= 0 && !instrumented) retranslate = 1;
            }
        }
    } else if (!strcmp(verb, "watch") || !strcmp(verb, "unwatch")) {
        char *t = strtok_r(NULL, " ", &save), *a = strtok_r(NULL, " ", &save),
             *l = strtok_r(NULL, " ", &save);
        if (t && a && l) {
            int type = (int)strtol(t, NULL, 16);
            uint64_t addr = strtoull(a, NULL, 16), len = strtoull(l, NULL, 16);
            struct watch *same = NULL, *free_slot = NULL;
            for (int i = 0; i < MAX_WATCH; i++) {
                struct watch *w = &watches[i];
                if (w->len && w->addr == addr && w->len == len && w->type == type) same = w;
                if (!w->len && !free_slot) free_slot = w;
            }
            if (verb[0] == 'u' && same) {
                same->len = 0;
                nwatch--;
            } else if (verb[0] == 'w' && !same && free_slot && len) {
                *free_slot = (struct watch){addr, len, type};
                if (nwatch++ == 0) { /* code translated so far has no memory callbacks */
                    if (held >= 0) retranslate = 1;
                    else flush_on_translate = 1;
                }
            }
        }
    } else if (!strcmp(verb, "setreg")) { /* the held vCPU waits in hold(): its state is still */
        char *name = strtok_r(NULL, " ", &save), *value = strtok_r(NULL, " ", &save);
        struct vcpu *v = held >= 0 ? &vcpus[held] : NULL;
        for (int i = 0; name && value && v && v->env && i < 16; i++)
            if (!strcmp(name, GPR_NAMES[i])) v->env[i] = strtoull(value, NULL, 16);
    } else if (!strcmp(verb, "stopped")) { /* QEMU's gdbstub stopped the machine */
        cancel_steps();
    } else if (!strcmp(verb, "flush")) { /* vmigdb wrote guest memory while held */
        if (held >= 0) retranslate = 1;
    } else if (!strcmp(verb, "del")) {
        char *a = strtok_r(NULL, " ", &save);
        struct bp *b = a ? find_bp(strtoull(a, NULL, 16)) : NULL;
        if (b && b->live) {
            clear_conds(b);
            b->live = 0;
            b->instrumented = 1; /* until on_translate translates addr without the callback */
            count_bp_page(b->addr, -1);
        }
    } else if (!strcmp(verb, "go")) {
        char *mode = strtok_r(NULL, " ", &save); /* after the vCPU number */
        mode = strtok_r(NULL, " ", &save);
        char *lo = strtok_r(NULL, " ", &save), *hi = strtok_r(NULL, " ", &save);
        go_mode = mode ? (int)strtol(mode, NULL, 16) : 0;
        go_lo = go_mode == 2 && lo ? strtoull(lo, NULL, 16) : 0;
        go_hi = go_mode == 2 && hi ? strtoull(hi, NULL, 16) : 0;
        /* atomic: a held vCPU reads it without the lock while it waits awake (spin_while_held) */
        __atomic_add_fetch(&release_gen, 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&released);
    }
    pthread_mutex_unlock(&lock);
}

static void *reader(void *arg)
{
    char buf[1 << 16];
    size_t have = 0;
    for (;;) {
        ssize_t n = read(sock, buf + have, sizeof buf - 1 - have);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        have += (size_t)n;
        char *start = buf, *nl;
        while ((nl = memchr(start, '\n', have - (size_t)(start - buf)))) {
            *nl = 0;
            command(start);
            start = nl + 1;
        }
        have -= (size_t)(start - buf);
        memmove(buf, start, have);
        if (have == sizeof buf - 1) have = 0; /* a line too long: drop it */
    }
    /* vmigdb is gone: forget every breakpoint and let the machine run on. */
    pthread_mutex_lock(&lock);
    for (unsigned i = 0; i < MAX_BPS; i++) {
        clear_conds(&bps[i]);
        bps[i].live = 0;
    }
    memset(bp_pages, 0, sizeof bp_pages);
    memset(watches, 0, sizeof watches);
    nwatch = 0;
    __atomic_store_n(&disconnected, 1, __ATOMIC_RELEASE); /* read unlocked by spin_while_held */
    step_mode = 0;
    for (int i = 0; i < nvcpus; i++) /* the next follow callback flushes step-mode code */
        *(uint64_t *)qemu_plugin_scoreboard_find(board, (unsigned)i) = FOLLOW_RECHECK;
    pthread_cond_broadcast(&released);
    pthread_mutex_unlock(&lock);
    return NULL;
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    const char *path = NULL;
    if (info->version.cur < VMIGDB_PLUGIN_API_VERSION) {
        fprintf(stderr, "vmigdb plugin: QEMU's plugin API is version %d, this plugin needs %d\n",
                info->version.cur, VMIGDB_PLUGIN_API_VERSION);
        return -1;
    }
    if (!info->system_emulation) {
        fprintf(stderr, "vmigdb plugin: needs system emulation\n");
        return -1;
    }
    for (int i = 0; i < argc; i++)
        if (!strncmp(argv[i], "sock=", 5)) path = argv[i] + 5;
    if (!path) {
        fprintf(stderr, "vmigdb plugin: no sock=PATH argument\n");
        return -1;
    }
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) return -1;
    strcpy(addr.sun_path, path);
    sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0) {
        fprintf(stderr, "vmigdb plugin: cannot connect to %s: %s\n", path, strerror(errno));
        return -1;
    }
    plugin_id = id;
    cond_cbs_safe = info->system.max_vcpus == 1; /* vCPU 0 is the one index the bug keeps */
    nvcpus = info->system.max_vcpus;
    vcpus = calloc((size_t)nvcpus, sizeof *vcpus);
    board = qemu_plugin_scoreboard_new(sizeof(uint64_t));
    follow = (qemu_plugin_u64){board, 0};
    register_callbacks();
    pthread_t t;
    if (pthread_create(&t, NULL, reader, NULL)) return -1;
    pthread_detach(t);
    return 0;
}
