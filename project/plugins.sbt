// Protobuf/gRPC Java code generation from proto/ferry/v1/*.proto (protoc from Maven Central).
addSbtPlugin("com.thesamet" % "sbt-protoc" % "1.0.8")
// The fat jar for spark-submit --jars.
addSbtPlugin("com.eed3si9n" % "sbt-assembly" % "2.3.1")
