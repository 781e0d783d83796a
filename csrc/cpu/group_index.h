// Arbitrary int64 group ids -> dense group numbers 0..G-1, in order of first appearance.
// Open addressing with linear probing: one pass over the ids, O(1) expected per id, and far
// cheaper than std::unordered_map (no node allocation). The numbering depends only on the ids,
// so everything built on it is deterministic.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace sfgrpo {

class GroupIndex {
 public:
  GroupIndex() { resize(64); }

  // The dense number of `id`, assigning the next one when `id` is new.
  int64_t insert(int64_t id) {
    uint64_t slot = hash(id) & mask_;
    while (true) {
      const int64_t group = slot_group_[slot];
      if (group < 0) break;
      if (slot_id_[slot] == id) return group;
      slot = (slot + 1) & mask_;
    }
    const int64_t group = static_cast<int64_t>(ids_.size());
    slot_id_[slot] = id;
    slot_group_[slot] = group;
    ids_.push_back(id);
    if (2 * ids_.size() > slot_group_.size()) resize(2 * slot_group_.size());  // load <= 1/2
    return group;
  }

  int64_t size() const { return static_cast<int64_t>(ids_.size()); }
  // Distinct ids, ids()[g] is the id of dense group g.
  const std::vector<int64_t>& ids() const { return ids_; }

 private:
  // splitmix64's finaliser: consecutive or strided ids (the usual case) spread over all slots.
  static uint64_t hash(int64_t id) {
    uint64_t x = static_cast<uint64_t>(id);
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
  }

  void resize(size_t capacity) {
    slot_id_.assign(capacity, 0);
    slot_group_.assign(capacity, -1);
    mask_ = capacity - 1;
    for (size_t g = 0; g < ids_.size(); ++g) {
      uint64_t slot = hash(ids_[g]) & mask_;
      while (slot_group_[slot] >= 0) slot = (slot + 1) & mask_;
      slot_id_[slot] = ids_[g];
      slot_group_[slot] = static_cast<int64_t>(g);
    }
  }

  std::vector<int64_t> slot_id_;
  std::vector<int64_t> slot_group_;  // -1: empty slot
  std::vector<int64_t> ids_;
  uint64_t mask_ = 0;
};

}  // namespace sfgrpo
