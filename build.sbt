// ferry's JVM side: Scala client, worker pool and Spark ML stages that call the Python worker.
//
// Sources live under scala/ (scala/src/main/scala/ferry, scala/src/test/scala/ferry,
// scala/src/test/java/ferry); Java + grpc-java stubs are generated from proto/ferry/v1/*.proto
// at build time into target/ and are never committed.
//
//   build/sbt -batch test        ScalaTest suites against a real local Spark and real workers
//   build/sbt -batch assembly    target/scala-2.13/ferry-assembly-<version>.jar for --jars

val sparkVersion = "4.1.0"
val arrowVersion = "18.3.0" // the Arrow that Spark 4.1.0 ships
val grpcVersion = "1.83.1" // newest grpc-java whose protoc-gen-grpc-java binary is on Maven Central
val protobufVersion = "3.25.9" // what grpc-protobuf depends on; protoc is the same version

ThisBuild / organization := "io.github.ferry"
ThisBuild / version := "0.1.0-SNAPSHOT"
ThisBuild / scalaVersion := "2.13.17"

lazy val root = (project in file("."))
  .settings(
    name := "ferry",
    // Nothing at the repository root is a source file.
    sourcesInBase := false,
    Compile / scalaSource := baseDirectory.value / "scala" / "src" / "main" / "scala",
    Compile / javaSource := baseDirectory.value / "scala" / "src" / "main" / "java",
    Compile / resourceDirectory := baseDirectory.value / "scala" / "src" / "main" / "resources",
    Test / scalaSource := baseDirectory.value / "scala" / "src" / "test" / "scala",
    Test / javaSource := baseDirectory.value / "scala" / "src" / "test" / "java",
    Test / resourceDirectory := baseDirectory.value / "scala" / "src" / "test" / "resources",
    scalacOptions ++= Seq("-deprecation", "-feature", "-unchecked", "-release", "17"),
    javacOptions ++= Seq("--release", "17"),
    libraryDependencies ++= Seq(
      "org.apache.spark" %% "spark-sql" % sparkVersion % Provided,
      "org.apache.spark" %% "spark-mllib" % sparkVersion % Provided,
      "org.apache.arrow" % "arrow-vector" % arrowVersion % Provided,
      "org.apache.arrow" % "arrow-memory-netty" % arrowVersion % Provided,
      "io.grpc" % "grpc-netty-shaded" % grpcVersion,
      "io.grpc" % "grpc-protobuf" % grpcVersion,
      "io.grpc" % "grpc-stub" % grpcVersion,
      "io.grpc" % "grpc-services" % grpcVersion, // grpc.health.v1 stubs
      "com.google.protobuf" % "protobuf-java" % protobufVersion,
      "org.scalatest" %% "scalatest" % "3.2.19" % Test
    ),

    // --- code generation: proto/ferry/v1/*.proto -> Java messages + grpc-java stubs ---
    PB.protocVersion := protobufVersion,
    Compile / PB.protoSources := Seq(baseDirectory.value / "proto"),
    Compile / PB.targets := Seq(
      PB.gens.java(protobufVersion) -> (Compile / sourceManaged).value / "java",
      PB.gens.plugin("grpc-java") -> (Compile / sourceManaged).value / "java"
    ),
    libraryDependencies += ("io.grpc" % "protoc-gen-grpc-java" % grpcVersion).asProtocPlugin(),

    // --- tests: a forked JVM that can run Spark 4 on Java 17 and launch real Python workers ---
    Test / fork := true,
    Test / parallelExecution := false,
    Test / testOptions += Tests.Argument(TestFrameworks.ScalaTest, "-oDF"),
    Test / javaOptions ++= {
      val python = sys.env.getOrElse("FERRY_PYTHON", (baseDirectory.value / ".venv" / "bin" / "python").getAbsolutePath)
      Seq(
        "-Xmx3g",
        "-Xss4m",
        s"-Dferry.python=$python",
        s"-Dferry.repo=${baseDirectory.value.getAbsolutePath}",
        "-Dspark.ui.enabled=false",
        "-XX:+IgnoreUnrecognizedVMOptions",
        "--add-modules=jdk.incubator.vector",
        "--add-opens=java.base/java.lang=ALL-UNNAMED",
        "--add-opens=java.base/java.lang.invoke=ALL-UNNAMED",
        "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
        "--add-opens=java.base/java.io=ALL-UNNAMED",
        "--add-opens=java.base/java.net=ALL-UNNAMED",
        "--add-opens=java.base/java.nio=ALL-UNNAMED",
        "--add-opens=java.base/java.util=ALL-UNNAMED",
        "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED",
        "--add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED",
        "--add-opens=java.base/jdk.internal.ref=ALL-UNNAMED",
        "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
        "--add-opens=java.base/sun.nio.cs=ALL-UNNAMED",
        "--add-opens=java.base/sun.security.action=ALL-UNNAMED",
        "--add-opens=java.base/sun.util.calendar=ALL-UNNAMED",
        "-Djdk.reflect.useDirectMethodHandle=false",
        "-Dio.netty.tryReflectionSetAccessible=true"
      )
    },
    Test / envVars ++= Map("PYTHONUNBUFFERED" -> "1", "SPARK_LOCAL_IP" -> "127.0.0.1"),

    // --- the fat jar: ferry + grpc + protobuf, shaded; no Spark, Arrow or Scala library ---
    assembly / assemblyJarName := s"ferry-assembly-${version.value}.jar",
    assembly / assemblyOption ~= (_.withIncludeScala(false)),
    assembly / test := {},
    assembly / assemblyShadeRules := Seq(
      ShadeRule.rename("com.google.protobuf.**" -> "ferry.shaded.protobuf.@1").inAll,
      ShadeRule.rename("com.google.common.**" -> "ferry.shaded.guava.@1").inAll,
      ShadeRule.rename("com.google.thirdparty.**" -> "ferry.shaded.guava.thirdparty.@1").inAll
    ),
    assembly / assemblyMergeStrategy := {
      case PathList("META-INF", "services", _*) => MergeStrategy.filterDistinctLines
      case PathList("META-INF", "MANIFEST.MF") => MergeStrategy.discard
      case PathList("META-INF", xs @ _*) if xs.lastOption.exists(n => n.endsWith(".SF") || n.endsWith(".DSA") || n.endsWith(".RSA")) =>
        MergeStrategy.discard
      case x if x.endsWith("module-info.class") => MergeStrategy.discard
      case PathList("META-INF", "versions", _*) => MergeStrategy.first
      case x if x.endsWith(".proto") => MergeStrategy.first
      case x if x.endsWith("io.netty.versions.properties") => MergeStrategy.first
      case x if x.endsWith("NOTICE") || x.endsWith("LICENSE") || x.endsWith("NOTICE.txt") || x.endsWith("LICENSE.txt") =>
        MergeStrategy.concat
      case x =>
        val old = (assembly / assemblyMergeStrategy).value
        old(x)
    }
  )
