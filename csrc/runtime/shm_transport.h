// Shared-memory transport for ranks that are processes on one host (CPU tensors).
//
// Over gloo, two processes on one host move every activation through loopback TCP: the
// sending thread copies into the socket, the kernel copies across, gloo's I/O thread copies
// out, and each side needs a core for the whole transfer. Here a message costs one memcpy on
// each side and a futex wake, so a pipeline of CPU ranks loses almost nothing to transfers.
//
// Layout. Every rank owns an inbox segment ("<name>-in-<rank>") holding one lane per peer;
// a lane has kSlots message slots. A sender takes a free slot of its lane in the receiver's
// inbox, copies the tensor into that slot's data segment ("/ppfast-<sender's pid>-<group>-
// <src>-<dst>-<slot>-<gen>", created by the sender and grown by replacing it with a new
// generation), writes tag, size and a sequence number, marks the slot full and wakes the
// receiver. Whenever a rank calls into the transport (posts, polls or waits), every message
// in its inbox that a posted receive wants (same source and tag; the oldest first) is copied
// into that receive's buffer and its slot freed, so receives posted early complete in any
// order. Sends that find no free slot wait in a queue that every call of this rank drives, so
// a rank blocked on a receive still delivers what it owes. Names are unlinked as soon as both
// sides have mapped them, or by the sender when the receiver died: nothing is left in
// /dev/shm after the ranks exit.
//
// Liveness. Ranks may share /dev/shm from different PID namespaces (containers), where a pid
// names another process or none, so no pid decides whether a process lives (the pids in names
// and messages are as each rank sees itself). Instead each rank holds a write lock of the
// open-file-description kind (fcntl F_OFD_SETLK) on its inbox for the transport's life, on a
// descriptor it keeps open after the name is unlinked; the kernel drops the lock when the
// process dies (a child forked from the rank without exec shares that open file description,
// and so the lock, until it exits too). Peers keep a descriptor of each inbox they map and ask F_OFD_GETLK (the same
// inode, so it works after the unlink) every 100 ms while they wait: no lock, that rank is
// gone. A data segment is locked the same way by its sender from creation until it sees the
// slot free again, by which time the receiver has unlinked the name; so every name of ours in
// /dev/shm is locked while the run that made it can still use it, and transports.sweep()
// removes only names that no one locks (and that are old: a creator locks just after
// creating). One name goes unlocked while still wanted: a message in flight when its sender
// is destroyed, which waits for its receiver (a sweep takes it only once it is a minute old).
// POSIX record locks conflict with OFD locks, flock() locks do not; the sweep uses OFD locks.
//
// Trust. Only segments that this process's effective uid owns and that group and others
// cannot open (mode 0600, as they are created) are mapped. Everything read from shared
// memory is checked before it is used: an inbox's group size and owner rank; the rank named
// by an abort; a slot's size against its capacity, its capacity against the segment it names
// (by fstat when mapped, by the mapping's length after) and its generation against the last
// one mapped. A bad field fails that receive with an error naming the source rank, never a
// read out of bounds.
//
// Failure. abort() marks every peer's inbox with this rank and the reason; waits check it,
// check that the peer still holds its lock, and time out.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "runtime/transport.h"

namespace ppfast {

struct ShmState;  // shm_transport.cpp

class ShmTransport : public Transport {
 public:
  // `name` is the same on every rank of the group and unique to it (it starts with '/').
  // Creates this rank's inbox; connect() maps the peers' ones once every rank has created its.
  ShmTransport(const std::string& name, int rank, int size);
  ~ShmTransport() override;
  void connect(std::chrono::milliseconds timeout);
  // Once every rank has connected: remove the inbox names (the mappings stay).
  void unlink_names();

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "shm"; }
  std::shared_ptr<Handle> send(const at::Tensor& tensor, int peer, int64_t tag) override;
  std::shared_ptr<Handle> recv(const at::Tensor& tensor, int peer, int64_t tag) override;
  void abort(const std::string& why) override;

 private:
  int rank_, size_;
  std::shared_ptr<ShmState> state_;
};

}  // namespace ppfast
