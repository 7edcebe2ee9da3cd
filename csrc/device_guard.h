// Makes a device current for one scope and the previous one current again after it.
//
// The CUDA runtime in _C is linked statically, so its cudaSetDevice makes that device's
// primary context current on the thread, and torch's own runtime reads its current
// device from that same context: a set without a restore silently moves torch to
// another GPU (a model split over GPUs has one bucket per device). Templated over the
// two runtime calls so a test can drive the guard with a fake driver on a CPU machine
// (tests/csrc/device_guard_test.cpp).
#pragma once

namespace aim {

// Api: static int get(int*), static int set(int) (0 = success), and
// static void fail(int error, const char* what), which throws.
template <class Api>
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    int prev = -1;
    if (int e = Api::get(&prev)) Api::fail(e, "cudaGetDevice");
    if (prev == device) return;                // nothing to set, nothing to restore
    if (int e = Api::set(device)) Api::fail(e, "cudaSetDevice");
    restore_ = prev;
  }
  ~DeviceGuard() {
    if (restore_ >= 0) Api::set(restore_);     // a destructor cannot throw; a failing
  }                                            // restore leaves a sticky error anyway
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int restore_ = -1;
};

}  // namespace aim
