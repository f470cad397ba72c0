//! StatefulSet PVC retention controller.
