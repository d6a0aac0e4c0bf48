"""Assembly sources of the demo guest (Intel syntax, keystone), one string per page.

Every source is a template formatted with the image's symbol addresses. Register conventions:
r15 holds the vCPU number (0 or 1) for the whole run, so per-vCPU counters are `[sym + r15*8]`;
user code must leave r15 alone (the syscall entry uses it to find the kernel stack).

keystone 0.9.2 encodes `mov r64, qword ptr [absolute]` wrongly for every register but rax (it
emits a RIP-relative operand holding the absolute address), so loads from fixed addresses go
through rax (the moffs form) or an index register; the image tests run the code and would notice.

Each source ends with `__exports`, a table of `.quad label` entries from which the image builder
reads the labels' addresses back (keystone does not report symbol values).
"""

from __future__ import annotations

# The kernel code page: both vCPUs' loops and every routine the tests put breakpoints on. The
# checksum routine reads this very page, so a 0xCC visible to the guest changes the sum.
KERNEL_TEXT = """
main0:
    mov ecx, {MSR_LSTAR}
    mov rax, {syscall_entry}
    mov rdx, rax
    shr rdx, 32
    wrmsr                                   # LSTAR written once at boot
    inc qword ptr [{lstar_writes}]
loop0:
    call func                               # a loop calling a function
    inc qword ptr [{iterations} + r15*8]
    cmp qword ptr [{cfg_checksum}], 0
    je after_checksum0
    call checksum
after_checksum0:
    cmp qword ptr [{cfg_jit}], 0
    je after_jit
    call jit_call
after_jit:
    cmp qword ptr [{cfg_int3}], 0
    je after_int3
    mov rax, qword ptr [{iterations}]
    and rax, qword ptr [{cfg_int3_mask}]
    jnz after_int3
guest_int3:
    int3                                    # the guest's own breakpoint: its handler must run
after_int3:
    cmp qword ptr [{cfg_lstar}], 0
    je after_lstar
    mov rax, qword ptr [{iterations}]
    and rax, qword ptr [{cfg_lstar_mask}]
    jnz after_lstar
    call rewrite_lstar
after_lstar:
    cmp qword ptr [{cfg_user}], 0
    je loop0
    call user_round
    jmp loop0

main1:
    call func
    inc qword ptr [{iterations} + r15*8]
    cmp qword ptr [{cfg_checksum}], 0
    je main1
    call checksum
    jmp main1

func:
    inc qword ptr [{func_calls} + r15*8]
func_body:
    mov rax, r15
    add rax, 0x10
    ret

checksum:                                   # rax = rotate-add sum of qwords of [start, start+len)
    mov rax, qword ptr [{sum_start}]
    mov rsi, rax
    mov rax, qword ptr [{sum_len}]
    mov rcx, rax
    xor eax, eax
checksum_loop:
    rol rax, 7
    add rax, qword ptr [rsi]
    add rsi, 8
    sub rcx, 8
    jnz checksum_loop
    mov qword ptr [{sum_last} + r15*8], rax
    cmp rax, qword ptr [{sum_expected}]
    je checksum_ok
    inc qword ptr [{sum_mismatch} + r15*8]
checksum_ok:
    inc qword ptr [{sum_runs} + r15*8]
    ret

jit_call:                                   # write `mov eax, seq; ret` into the JIT page, run it
    mov rdi, {jit_page}
    mov rax, qword ptr [{jit_seq}]
    inc rax
    mov qword ptr [{jit_seq}], rax
    mov byte ptr [rdi], 0xb8
    mov dword ptr [rdi + 1], eax
    mov byte ptr [rdi + 5], 0xc3
    call rdi
    mov qword ptr [{jit_result}], rax
    ret

rewrite_lstar:                              # what a rootkit does, here with the same value
    mov ecx, {MSR_LSTAR}
    mov rax, {syscall_entry}
    mov rdx, rax
    shr rdx, 32
    wrmsr
    inc qword ptr [{lstar_writes}]
    ret

user_round:                                 # run the user routine in address space A, then B
    mov rax, {cr3_a}
    mov cr3, rax
    call enter_user
    mov rax, {cr3_b}
    mov cr3, rax
    call enter_user
    mov rax, {cr3_a}
    mov cr3, rax
    inc qword ptr [{user_rounds}]
    ret

enter_user:                                 # sysret to user code; its syscall returns here
    mov qword ptr [{saved_rsp} + r15*8], rsp
    mov rcx, {user_entry}
    mov r11, 0x202
    .byte 0x48, 0x0f, 0x07                  # sysretq (keystone lacks the mnemonic)

.align 8
__exports:
    .quad main0, loop0, main1, func, func_body, checksum, checksum_loop, jit_call, guest_int3
    .quad after_int3, rewrite_lstar, user_round, enter_user
"""
KERNEL_TEXT_EXPORTS = (
    "main0", "loop0", "main1", "func", "func_body", "checksum", "checksum_loop", "jit_call",
    "guest_int3", "after_int3", "rewrite_lstar", "user_round", "enter_user",
)

# Exception handlers and the syscall entry, on their own page (outside the checksummed one).
KERNEL_ENTRY = """
bp_handler:                                 # #BP: count, record the return RIP, resume
    push rax
    mov rax, qword ptr [rsp + 8]
    mov qword ptr [{bp_last_rip}], rax
    inc qword ptr [{bp_count}]
    pop rax
    iretq

db_handler:                                 # #DB: count, record the return RIP, resume
    push rax
    mov rax, qword ptr [rsp + 8]
    mov qword ptr [{db_last_rip}], rax
    inc qword ptr [{db_count}]
    pop rax
    iretq

syscall_entry:                              # back from user mode: resume the kernel after sysret
    mov rsp, qword ptr [{saved_rsp} + r15*8]
    ret

unexpected_common:                          # any other exception: record it and stop this vCPU
    mov qword ptr [{unexpected_vector}], rax
    inc qword ptr [{unexpected_count}]
unexpected_spin:
    pause
    jmp unexpected_spin

.align 8
__exports:
    .quad bp_handler, db_handler, syscall_entry, unexpected_common, unexpected_spin
"""
KERNEL_ENTRY_EXPORTS = (
    "bp_handler", "db_handler", "syscall_entry", "unexpected_common", "unexpected_spin",
)

# One stub per vector for the unexpected ones: `mov eax, vector; jmp unexpected_common`.
UNEXPECTED_STUB = "    mov eax, {vector}\n    jmp {unexpected_common}\n"

# The user routine, mapped at the same virtual address in both address spaces: it counts in its
# own address space's data page and returns to the kernel with syscall.
USER_TEXT = """
user_entry:
    mov rsp, {user_stack_top}
    inc qword ptr [{user_data}]
    cmp qword ptr [{user_data} + 8], 0      # this address space's own int3 switch
    je user_syscall
user_int3:
    int3                                    # a ring-3 breakpoint of the guest's own
user_syscall:
    syscall

.align 8
__exports:
    .quad user_entry, user_int3, user_syscall
"""
USER_TEXT_EXPORTS = ("user_entry", "user_int3", "user_syscall")
