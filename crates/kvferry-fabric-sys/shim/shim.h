/* libfabric's data-path calls are static inline wrappers over per-object ops tables; these are
 * exported, linkable copies of the ones kvferry uses. Each forwards to the inline of the same name
 * without the `kvferry_` prefix. */
#ifndef KVFERRY_FABRIC_SHIM_H
#define KVFERRY_FABRIC_SHIM_H

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

int kvferry_fi_close(struct fid *fid);
int kvferry_fi_domain(struct fid_fabric *fabric, struct fi_info *info, struct fid_domain **domain, void *context);
int kvferry_fi_endpoint(struct fid_domain *domain, struct fi_info *info, struct fid_ep **ep, void *context);
int kvferry_fi_cq_open(struct fid_domain *domain, struct fi_cq_attr *attr, struct fid_cq **cq, void *context);
int kvferry_fi_av_open(struct fid_domain *domain, struct fi_av_attr *attr, struct fid_av **av, void *context);
int kvferry_fi_ep_bind(struct fid_ep *ep, struct fid *bfid, uint64_t flags);
int kvferry_fi_enable(struct fid_ep *ep);
int kvferry_fi_getname(fid_t fid, void *addr, size_t *addrlen);
int kvferry_fi_av_insert(struct fid_av *av, const void *addr, size_t count, fi_addr_t *fi_addr, uint64_t flags,
                         void *context);
int kvferry_fi_av_remove(struct fid_av *av, fi_addr_t *fi_addr, size_t count, uint64_t flags);
int kvferry_fi_mr_regattr(struct fid_domain *domain, const struct fi_mr_attr *attr, uint64_t flags,
                          struct fid_mr **mr);
void *kvferry_fi_mr_desc(struct fid_mr *mr);
uint64_t kvferry_fi_mr_key(struct fid_mr *mr);
int kvferry_fi_mr_bind(struct fid_mr *mr, struct fid *bfid, uint64_t flags);
int kvferry_fi_mr_enable(struct fid_mr *mr);
ssize_t kvferry_fi_readmsg(struct fid_ep *ep, const struct fi_msg_rma *msg, uint64_t flags);
ssize_t kvferry_fi_writemsg(struct fid_ep *ep, const struct fi_msg_rma *msg, uint64_t flags);
ssize_t kvferry_fi_sendmsg(struct fid_ep *ep, const struct fi_msg *msg, uint64_t flags);
ssize_t kvferry_fi_recvmsg(struct fid_ep *ep, const struct fi_msg *msg, uint64_t flags);
ssize_t kvferry_fi_cq_read(struct fid_cq *cq, void *buf, size_t count);
ssize_t kvferry_fi_cq_readerr(struct fid_cq *cq, struct fi_cq_err_entry *buf, uint64_t flags);
ssize_t kvferry_fi_cq_sread(struct fid_cq *cq, void *buf, size_t count, const void *cond, int timeout);
int kvferry_fi_cq_signal(struct fid_cq *cq);
const char *kvferry_fi_cq_strerror(struct fid_cq *cq, int prov_errno, const void *err_data, char *buf, size_t len);

#endif
