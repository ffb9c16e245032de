package ferry

import com.google.protobuf.InvalidProtocolBufferException
import ferry.proto.v1.LOPQModelParams
import org.apache.hadoop.conf.Configuration
import org.apache.hadoop.fs.Path
import org.apache.spark.ml.Model
import org.apache.spark.ml.ferry.ParamsPersistence
import org.apache.spark.ml.param.{Param, ParamMap, Params}
import org.apache.spark.ml.util.{Identifiable, MLReadable, MLReader, MLWritable, MLWriter}
import org.apache.spark.sql.{DataFrame, Dataset, SparkSession}
import org.apache.spark.sql.types._

/** Params of [[LopqModel]]. */
trait LopqModelParams extends Params {

  /** Column of row ids, copied to the output (any type). Default: "id". */
  final val idCol: Param[String] = new Param[String](this, "idCol",
    "column of row ids, copied to the output (any type; default id)", (s: String) => s != null && s.nonEmpty)

  /** Column of vectors: array<float> or array<double> of the model's input dimension. Default: "vector". */
  final val vectorCol: Param[String] = new Param[String](this, "vectorCol",
    "column of vectors: array<float> or array<double> of the model's input dimension (default vector)",
    (s: String) => s != null && s.nonEmpty)

  setDefault(idCol -> "id", vectorCol -> "vector")

  def getIdCol: String = $(idCol)
  def getVectorCol: String = $(vectorCol)
}

/**
 * A trained LOPQ model (the `LOPQModelParams` protobuf of ferry and of the reference
 * implementation) encoding vectors through ferry's Python workers: the output has one row per
 * input row with `idCol`, `coarse` (array<int>: c0, c1) and `fine` (array<int>: f0..fM-1).
 * Other input columns are not carried over; join back on the id if you need them.
 *
 * The model file travels to each worker once, as a content-addressed resource, not with every
 * task. Works on batch and streaming DataFrames. Saved with `write.save(path)` as Spark ML
 * metadata plus the protobuf itself (`data/model.lopq`), which any reader of the format loads.
 *
 * {{{
 *   val codes = LopqModel.fromFile("model.lopq").setVectorCol("features").transform(df)
 * }}}
 */
class LopqModel private[ferry] (override val uid: String, bytes: Array[Byte])
  extends Model[LopqModel] with LopqModelParams with MLWritable {

  private val proto: LOPQModelParams = LopqModel.parse(bytes, s"the model of $uid")

  /** sha256 of the model file: its name on the workers. */
  val digest: String = WorkerClient.sha256Hex(bytes)

  /** Dimension of the vectors the model takes (before its PCA, when it has one). */
  def inputDim: Int = if (proto.hasPcaMean) proto.getPcaMean.getValuesCount else proto.getD

  /** Coarse clusters per half (V). */
  def numCoarseClusters: Int = proto.getV

  /** Subquantizers (M): the number of fine codes per vector. */
  def numSubquantizers: Int = proto.getM

  /** A copy of the model file's bytes. */
  def modelBytes: Array[Byte] = bytes.clone()

  def setIdCol(value: String): this.type = set(idCol, value)
  def setVectorCol(value: String): this.type = set(vectorCol, value)

  private def stageParams: String =
    Json.encode(Map("model" -> digest, "id_col" -> $(idCol), "vector_col" -> $(vectorCol)))

  private def inputSchema(schema: StructType): StructType = {
    def find(name: String, role: String) = schema.find(_.name == name).getOrElse(
      throw new SchemaMismatchException(LopqModel.Stage, s"LopqModel's $role column '$name' does not exist; the " +
        s"DataFrame has ${schema.fieldNames.mkString(", ")}. Rename the column or set ${role}Col."))
    val id = find($(idCol), "id")
    val vec = find($(vectorCol), "vector")
    vec.dataType match {
      case ArrayType(FloatType | DoubleType, _) =>
      case other =>
        throw new SchemaMismatchException(LopqModel.Stage, s"LopqModel's vector column '${vec.name}' must be " +
          s"array<float> or array<double> (of $inputDim values), found ${other.simpleString}. Convert it, e.g. " +
          "pyspark.ml.functions.vector_to_array or org.apache.spark.ml.functions.vector_to_array for ML vectors.")
    }
    StructType(Seq(id, vec))
  }

  override def transformSchema(schema: StructType): StructType = {
    val described = WorkerPool.get(PythonStage.activeConf).withClient(
      _.describe(LopqModel.Stage, stageParams, Some(inputSchema(schema))))
    described.outputSchema.getOrElse(throw new ProtocolException(
      s"The worker's Describe of '${LopqModel.Stage}' returned no output schema."))
  }

  override def transform(dataset: Dataset[_]): DataFrame = {
    val out = transformSchema(dataset.schema)
    PythonStage.execute(dataset, LopqModel.Stage, stageParams, Seq($(idCol), $(vectorCol)), out, Seq(bytes))
  }

  override def copy(extra: ParamMap): LopqModel = copyValues(new LopqModel(uid, bytes), extra).setParent(parent)

  override def write: MLWriter = new LopqModel.Writer(this)

  override def toString: String = s"LopqModel($uid, D=$inputDim, V=$numCoarseClusters, M=$numSubquantizers)"
}

object LopqModel extends MLReadable[LopqModel] {

  /** The worker stage that encodes. */
  val Stage = "lopq_encode"

  private val DataFile = "data/model.lopq"

  /** A model from the bytes of a model file. */
  def fromBytes(bytes: Array[Byte]): LopqModel = new LopqModel(Identifiable.randomUID("lopqModel"), bytes.clone())

  /** A model from a model file (any Hadoop path: local, HDFS, object stores). */
  def fromFile(path: String): LopqModel = fromBytes(readFile(path, hadoopConf))

  override def read: MLReader[LopqModel] = new Reader

  override def load(path: String): LopqModel = super.load(path)

  private def hadoopConf: Configuration =
    SparkSession.getActiveSession.map(_.sparkContext.hadoopConfiguration).getOrElse(new Configuration())

  private def readFile(path: String, conf: Configuration): Array[Byte] = {
    val p = new Path(path)
    val fs = p.getFileSystem(conf)
    if (!fs.exists(p)) {
      throw new InvalidInputException(Stage, s"LOPQ model file $path does not exist.")
    }
    val in = fs.open(p)
    try in.readAllBytes() finally in.close()
  }

  /** Parses and sanity-checks a model file; the worker checks the rest when it loads it. */
  private[ferry] def parse(bytes: Array[Byte], what: String): LOPQModelParams = {
    val fix = "Give a file written by ferry's LOPQModel.save / LopqModel.write or by the reference's " +
      "export_proto (an LOPQModelParams protobuf, usually *.lopq)."
    if (bytes.isEmpty) throw new InvalidInputException(Stage, s"$what is empty (0 bytes). $fix")
    if (bytes.length >= 2 && (bytes(0) & 0xff) == 0x80 && bytes(1) >= 2 && bytes(1) <= 5) {
      throw new InvalidInputException(Stage, s"$what is a Python pickle, not an LOPQModelParams protobuf; ferry " +
        "never loads pickles. Convert it once, where you trust it, with the reference's LOPQModel.export_proto(path).")
    }
    val m =
      try LOPQModelParams.parseFrom(bytes)
      catch {
        case e: InvalidProtocolBufferException =>
          throw new InvalidInputException(Stage, s"$what (${bytes.length} bytes) does not parse as an " +
            s"LOPQModelParams protobuf (${e.getMessage}): the file is truncated or not an LOPQ model. $fix", e)
      }
    val missing = Seq("D" -> m.hasD, "V" -> m.hasV, "M" -> m.hasM).collect { case (f, false) => f } ++
      Seq("Cs (coarse centroids)" -> m.getCsCount, "subs (subquantizers)" -> m.getSubsCount)
        .collect { case (f, 0) => f }
    if (missing.nonEmpty) {
      throw new InvalidInputException(Stage, s"$what parses but lacks ${missing.mkString(", ")}: it is not a " +
        s"trained LOPQ model. $fix")
    }
    m
  }

  private class Writer(model: LopqModel) extends MLWriter {
    override protected def saveImpl(path: String): Unit = {
      ParamsPersistence.saveMetadata(model, path, sparkSession)
      val p = new Path(path, DataFile)
      val out = p.getFileSystem(sparkSession.sparkContext.hadoopConfiguration).create(p, true)
      try out.write(model.modelBytes) finally out.close()
    }
  }

  private class Reader extends MLReader[LopqModel] {
    private val cls = classOf[LopqModel].getName

    override def load(path: String): LopqModel = {
      val uid = ParamsPersistence.loadUid(path, sparkSession, cls)
      val bytes = readFile(new Path(path, DataFile).toString, sparkSession.sparkContext.hadoopConfiguration)
      val model = new LopqModel(uid, bytes)
      ParamsPersistence.loadParams(model, path, sparkSession, cls)
      model
    }
  }
}
