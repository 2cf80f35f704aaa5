import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2


def test_smoke(prediction_stub):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digitgan"
    request.inputs["noise"].CopyFrom(tf.make_tensor_proto(np.zeros([2, 100], np.float32)))
    response = prediction_stub.Predict(request, 10)
    assert response.model_spec.version.value == 1
    assert len(response.outputs["images"].float_val) == 2 * 784
