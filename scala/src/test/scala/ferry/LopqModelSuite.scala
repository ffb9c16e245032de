package ferry

import java.io.File
import java.nio.file.Files

import scala.jdk.CollectionConverters._

import org.apache.spark.sql.{DataFrame, Encoders, Row}
import org.apache.spark.sql.execution.streaming.runtime.MemoryStream
import org.apache.spark.sql.functions.col
import org.apache.spark.sql.types._
import org.scalatest.funsuite.AnyFunSuite

/** LopqModel against the reference fixture: a model written by the reference, and its codes. */
class LopqModelSuite extends AnyFunSuite with SparkSuite {

  private val data = new File(sys.env.getOrElse("FERRY_SHARED_DATA", s"${TestSpark.repo}/../shared/data"), "lopq")
  private val modelFile = new File(data, "random_test_model.lopq")

  /** (id, vector, coarse, fine) of the reference's examples. */
  private lazy val examples: Seq[(Long, Array[Double], Seq[Int], Seq[Int])] =
    Files.readAllLines(new File(data, "random_test_model_examples.jsonl").toPath).asScala.filter(_.trim.nonEmpty)
      .map { line =>
        val m = new com.fasterxml.jackson.databind.ObjectMapper().readTree(line)
        val vec = m.get("vector").elements().asScala.map(_.asDouble()).toArray
        val code = m.get("code")
        (m.get("id").asLong(), vec, code.get(0).elements().asScala.map(_.asInt()).toSeq,
          code.get(1).elements().asScala.map(_.asInt()).toSeq)
      }.toSeq

  private val schema = StructType(Seq(StructField("id", LongType), StructField("vector", ArrayType(DoubleType))))

  private def vectors(parts: Int): DataFrame = spark.createDataFrame(
    spark.sparkContext.parallelize(examples.map { case (id, v, _, _) => Row(id, v.toSeq) }, parts), schema)

  private def checkCodes(out: DataFrame, what: String): Unit = {
    val got = out.collect().map(r => r.getLong(0) -> (r.getSeq[Int](1), r.getSeq[Int](2))).toMap
    assert(got.size == examples.length, s"$what: ${got.size} rows")
    examples.foreach { case (id, _, c, f) => assert(got(id) == (c, f), s"$what: id $id") }
  }

  test("a reference model file encodes the reference's examples to the reference's codes, any partitioning") {
    val model = LopqModel.fromFile(modelFile.getAbsolutePath)
    assert(model.inputDim == examples.head._2.length && model.numSubquantizers == examples.head._4.length)
    Seq(1, 3, 7).foreach(p => checkCodes(model.transform(vectors(p)), s"$p partitions"))
    // float vectors and other column names
    val floats = vectors(2).select(col("id").as("key"), col("vector").cast("array<float>").as("features"))
    val out = model.copy(org.apache.spark.ml.param.ParamMap.empty).setIdCol("key").setVectorCol("features")
      .transform(floats)
    assert(out.columns.toSeq == Seq("key", "coarse", "fine"))
    assert(out.count() == examples.length)
  }

  test("transform runs no job, over a shuffled input too (AQE on and off); the action encodes every row") {
    val model = LopqModel.fromFile(modelFile.getAbsolutePath)
    Seq("true", "false").foreach { aqe =>
      withConf("spark.sql.adaptive.enabled" -> aqe) {
        val (out, during) = jobsDuring(model.transform(vectors(3).repartition(2)))
        assert(during.isEmpty, (aqe, during))
        checkCodes(out, s"AQE $aqe")
      }
    }
  }

  test("the model is uploaded once per worker, then named by digest") {
    val model = LopqModel.fromFile(modelFile.getAbsolutePath)
    assert(model.digest == WorkerClient.sha256Hex(Files.readAllBytes(modelFile.toPath)))
    WorkerPool.get(PythonStage.activeConf).withClient { c =>
      assert(c.ensureResource(model.modelBytes) == model.digest)
      assert(c.ensureResource(model.modelBytes) == model.digest) // cached: no second upload
    }
  }

  test("save and load round trip: Spark ML metadata plus the protobuf, byte for byte") {
    val model = LopqModel.fromFile(modelFile.getAbsolutePath).setVectorCol("v")
    val dir = new File(TestSpark.newDir("lopq"), "model").getAbsolutePath
    model.write.save(dir)
    val back = LopqModel.load(dir)
    assert(back.uid == model.uid && back.getVectorCol == "v")
    assert(back.modelBytes.sameElements(Files.readAllBytes(modelFile.toPath)))
    assert(Files.readAllBytes(new File(dir, "data/model.lopq").toPath).sameElements(model.modelBytes))
    checkCodes(back.setVectorCol("vector").transform(vectors(2)), "loaded")
  }

  test("a streaming query encodes with the model") {
    val model = LopqModel.fromFile(modelFile.getAbsolutePath)
    val byId = examples.map { case (id, v, _, _) => id -> v.toSeq }.toMap
    val vectorOf = org.apache.spark.sql.functions.udf((id: Long) => byId(id))
    val ids = MemoryStream[Long](Encoders.scalaLong, spark)
    val input = ids.toDF().select(col("value").as("id"), vectorOf(col("value")).as("vector"))
    val out = model.transform(input)
    assert(out.isStreaming)
    val query = out.writeStream.format("memory").queryName("ferry_lopq_codes").outputMode("append").start()
    try {
      ids.addData(examples.take(7).map(_._1): _*)
      query.processAllAvailable()
      ids.addData(examples.drop(7).map(_._1): _*)
      query.processAllAvailable()
      checkCodes(spark.table("ferry_lopq_codes"), "streaming")
    } finally query.stop()
  }

  test("bad model files and bad columns fail with typed, explaining exceptions") {
    val good = Files.readAllBytes(modelFile.toPath)
    val truncated = intercept[InvalidInputException](LopqModel.fromBytes(good.take(good.length / 2)))
    assert(truncated.getMessage.contains("does not parse as an LOPQModelParams protobuf"), truncated.getMessage)
    val pickle = intercept[InvalidInputException](LopqModel.fromBytes(Array[Byte](0x80.toByte, 4, 0x95.toByte, 1, 2)))
    assert(pickle.getMessage.contains("Python pickle"), pickle.getMessage)
    val empty = intercept[InvalidInputException](LopqModel.fromBytes(Array.empty[Byte]))
    assert(empty.getMessage.contains("empty"))
    val foreign = intercept[InvalidInputException](LopqModel.fromBytes("{\"D\": 8}".getBytes))
    assert(foreign.getMessage.contains("LOPQModelParams"), foreign.getMessage)
    assert(intercept[InvalidInputException](LopqModel.fromFile("/no/such/model.lopq")).getMessage
      .contains("does not exist"))

    val model = LopqModel.fromFile(modelFile.getAbsolutePath)
    val noVector = intercept[SchemaMismatchException](model.setVectorCol("features").transform(vectors(1)))
    assert(noVector.getMessage.contains("'features' does not exist"), noVector.getMessage)
    val strings = vectors(1).select(col("id"), col("vector").cast("string").as("vector"))
    val wrongType = intercept[SchemaMismatchException](model.setVectorCol("vector").transform(strings))
    assert(wrongType.getMessage.contains("must be array<float> or array<double>"), wrongType.getMessage)
    // Wrong dimension: found by the worker, surfaced as the stage's typed error with its message.
    val short = vectors(1).select(col("id"), org.apache.spark.sql.functions.slice(col("vector"), 1, 3).as("vector"))
    val e = intercept[Exception](model.transform(short).collect())
    val f = FerryException.find(e).getOrElse(fail("no FerryException", e))
    assert(f.isInstanceOf[InvalidInputException] && f.getMessage.contains("dimension"), f.getMessage)
  }
}
