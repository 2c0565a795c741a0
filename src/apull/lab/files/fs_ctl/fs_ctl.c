// SPDX-License-Identifier: GPL-2.0
/*
 * fs_ctl - the apull lab's reproduction of EulerOS's fs_ctl gate.
 *
 * EulerOS ships EROFS and cachefiles with on-demand (fscache) loading compiled in,
 * but switched off until someone enables it through two parameters of its fs_ctl
 * module:
 *
 *   /sys/module/fs_ctl/parameters/erofs_enabled
 *   /sys/module/fs_ctl/parameters/cachefiles_ondemand_enabled
 *
 * Both read N or Y, start at N and can only be switched on: once Y, writing N
 * fails with -EBUSY. They are not persistent; a reload or a reboot starts at N again.
 * Our deployment tooling has to handle exactly that, so the lab's QEMU nodes (Debian
 * with rebuilt on-demand erofs/cachefiles modules) load this module to present the same
 * interface. It only keeps the two flags: it does not gate anything in the kernel itself.
 */
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/string.h>

static bool erofs_enabled;
static bool cachefiles_ondemand_enabled;

/*
 * Parse like param_set_bool (no value means "on"), then allow off -> on, on -> on and
 * off -> off, but never on -> off. Writers are serialised by the module's param lock.
 */
static int fs_ctl_set_once(const char *val, const struct kernel_param *kp)
{
	bool *flag = kp->arg;
	bool on;
	int ret;

	ret = kstrtobool(val ? val : "1", &on);
	if (ret)
		return ret;
	if (*flag && !on)
		return -EBUSY;
	if (on && !*flag)
		pr_info("%s enabled\n", kp->name);
	*flag = on;
	return 0;
}

static const struct kernel_param_ops fs_ctl_once_ops = {
	.flags = KERNEL_PARAM_OPS_FL_NOARG,
	.set = fs_ctl_set_once,
	.get = param_get_bool,
};

module_param_cb(erofs_enabled, &fs_ctl_once_ops, &erofs_enabled, 0644);
MODULE_PARM_DESC(erofs_enabled, "EROFS over fscache enabled (on-only-once, default N)");
module_param_cb(cachefiles_ondemand_enabled, &fs_ctl_once_ops,
		&cachefiles_ondemand_enabled, 0644);
MODULE_PARM_DESC(cachefiles_ondemand_enabled,
		 "cachefiles on-demand mode enabled (on-only-once, default N)");

MODULE_LICENSE("GPL");
MODULE_AUTHOR("apull-deploy");
MODULE_DESCRIPTION("apull lab's reproduction of EulerOS's fs_ctl gate (erofs/cachefiles on-demand switches)");
