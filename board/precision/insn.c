/*
 * A qemu TCG plugin that counts the guest instructions a qemu-user process executes, over all
 * its threads, and prints the total at exit:  "insns: <n>".
 *
 * Why a plugin: under qemu-user there is no callgrind and `perf stat` counts the host's
 * instructions (the translator's), not the guest's. Debian's qemu-user (7.2) is built with
 * plugin support (`-plugin`) but ships no plugins and no <qemu/qemu-plugin.h>, so the few
 * declarations used here are repeated below; they have been stable since qemu 4.2.
 *
 *   gcc -shared -fPIC -O2 -o insn.so board/precision/insn.c
 *   qemu-aarch64 -plugin ./insn.so -d plugin -cpu cortex-a76 -L /usr/aarch64-linux-gnu PROGRAM...
 *
 * Each translated block gets an exec callback that adds its instruction count atomically, so
 * the count is exact with several guest threads (an inline add, cheaper, is not atomic under
 * qemu's multi-threaded TCG). A block left early by an exception is still counted whole: a few
 * instructions per fault, none in the workloads measured here.
 */
#include <inttypes.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t;
struct qemu_plugin_tb;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, qemu_plugin_vcpu_udata_cb_t cb,
                                          enum qemu_plugin_cb_flags flags, void *userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);
void qemu_plugin_outs(const char *string);

/* qemu 7.2 accepts plugins of API version 0 to 1 */
__attribute__((visibility("default"))) int qemu_plugin_version = 1;

static uint64_t insns;

static void tb_exec(unsigned int vcpu_index, void *udata)
{
    (void)vcpu_index;
    __atomic_fetch_add(&insns, (uint64_t)(uintptr_t)udata, __ATOMIC_RELAXED);
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    uintptr_t n = qemu_plugin_tb_n_insns(tb);
    qemu_plugin_register_vcpu_tb_exec_cb(tb, tb_exec, QEMU_PLUGIN_CB_NO_REGS, (void *)n);
}

static void at_exit(qemu_plugin_id_t id, void *udata)
{
    (void)id;
    (void)udata;
    char line[64];
    snprintf(line, sizeof line, "insns: %" PRIu64 "\n", __atomic_load_n(&insns, __ATOMIC_RELAXED));
    qemu_plugin_outs(line);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                                               int argc, char **argv)
{
    (void)info;
    (void)argc;
    (void)argv;
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
